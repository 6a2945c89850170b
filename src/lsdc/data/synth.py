"""Stub: being written (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import argparse


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def synth_from_args(args: argparse.Namespace) -> int:
    raise NotImplementedError("lsdc synth is not written yet")
