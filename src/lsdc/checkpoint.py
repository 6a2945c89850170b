"""Checkpoints: written atomically (a kill mid-write leaves the previous one intact), read back
with a clear error when a file is not a checkpoint."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsdc.errors import UserError
from lsdc.utils import atomic_path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` through a temporary file and a rename.

    Saved through an open file, not a path: given a path, torch names the archive's records
    after the file (here the temporary one, a random name), so the same state would give other
    bytes each time; through a file they are ``archive/...``, and a checkpoint is the same bytes
    whenever its state is.
    """
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        torch.save(state, file)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Checkpoints hold RNG states (numpy arrays, Python tuples), so they are read with
    ``weights_only=False``: load only runs you trust, as with any pickle.

    Raises:
        UserError: the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: not an lsdc checkpoint (no 'model' entry)")
    return state


def rng_states() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, so a resumed run draws the same numbers."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` captured."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
