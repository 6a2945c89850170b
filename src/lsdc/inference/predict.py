"""Stub: being written (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import argparse


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def predict_from_args(args: argparse.Namespace) -> int:
    raise NotImplementedError("lsdc predict is not written yet")
