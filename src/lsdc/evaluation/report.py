"""Stub: being written (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import argparse


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def evaluate_from_args(args: argparse.Namespace) -> int:
    raise NotImplementedError("lsdc evaluate is not written yet")
