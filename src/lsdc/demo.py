"""Stub: being written (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import argparse


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def demo_from_args(args: argparse.Namespace) -> int:
    raise NotImplementedError("lsdc demo is not written yet")
