"""Atomic checkpoints and the random-number state that makes a resumed run continue exactly."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half of one.

    The bytes go to a temporary file in the same directory, are flushed to disk, and replace ``path``
    with one ``os.replace`` (atomic on POSIX and Windows). Missing parent directories are created; the
    file gets the usual permissions (``0o666`` minus the umask).

    Args:
        path: the destination file.
        data: its new content.

    Raises:
        OSError: if the directory or file cannot be written (the temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text.

    Args:
        path: the destination file.
        text: its new content, written as UTF-8.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`atomic_write_text` of ``obj`` as indented JSON (sorted keys, trailing newline).

    Args:
        path: the destination file.
        obj: a JSON-serialisable object.

    Raises:
        TypeError: if ``obj`` is not JSON-serialisable.
    """
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path`` atomically (`atomic_write_bytes`).

    Args:
        path: the checkpoint file.
        state: what to save (tensors, state dicts, plain Python objects).
    """
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` onto the CPU.

    It is read with ``weights_only=False`` (it holds RNG states and plain Python objects), so load only
    checkpoints you trust.

    Args:
        path: the checkpoint file.

    Returns:
        The saved dict, with every tensor on the CPU.
    """
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    """The state of every random-number generator the trainer uses (Python, NumPy, torch CPU and CUDA).

    Returns:
        ``{"python", "numpy", "torch"}`` states, plus ``"cuda"`` (all devices) when CUDA is available.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (the CUDA states only where CUDA is available).

    Args:
        state: a dict from `rng_state`.
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices).

    Args:
        seed: the seed (NumPy gets it modulo $2^{32}$).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
