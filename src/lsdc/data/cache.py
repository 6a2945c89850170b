"""Stub: being written (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import argparse


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def preprocess_from_args(args: argparse.Namespace) -> int:
    raise NotImplementedError("lsdc preprocess is not written yet")
