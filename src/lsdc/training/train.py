"""Stub: being written (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import argparse


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def train_from_args(args: argparse.Namespace) -> int:
    raise NotImplementedError("lsdc train is not written yet")
