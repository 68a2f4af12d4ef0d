"""The tiny training set-up shared by the trainer tests: a generated folder dataset and the flags of a
seconds-long `python -m dml.train` run with the tiny backbone on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

#: the repository root (the checkout under test: its dml is the one the subprocesses import)
REPO = Path(__file__).resolve().parents[2]


def make_folder_dataset(root, classes=16, per_class=4, size=24, *, mixed_sizes=False, names=None):
    """Class c: a coloured square at a class-specific position on noise (learnable, not trivial).

    ``mixed_sizes``: image i of a class is ``(size + i) × (size + 2i)`` instead of square, so that random
    crops of different images consume different numbers of draws. ``names``: the class folders' names
    (default ``class_00`` …).
    """
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / (names[c] if names else f"class_{c:02d}")
        d.mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        y0, x0 = rng.integers(0, size // 2, 2)
        for i in range(per_class):
            shape = (size + i, size + 2 * i, 3) if mixed_sizes else (size, size, 3)
            img = rng.integers(0, 256, shape).astype(np.uint8) // 2
            img[y0:y0 + size // 2, x0:x0 + size // 2] = colour
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def tiny_args(data_root, out, *extra, eval_batch_size=16):
    """Flags of a tiny run: folder data, tiny backbone, 16-d embedding, batches of 8 (2 per class), CPU, seed 3."""
    return ["--output-dir", str(out), "--dataset", "folder", "--data-root", str(data_root), "--backbone", "tiny",
            "--weights", "none", "--embed-dim", "16", "--batch-size", "8", "--samples-per-class", "2",
            "--device", "cpu", "--seed", "3", "--eval-batch-size", str(eval_batch_size), "--val-fraction", "0.25",
            *extra]


def tiny_trainer(config, *, dist=None, quiet=True):
    """A `dml.trainer.Trainer` for a parsed configuration, built as ``dml.train`` builds it (no files written)."""
    import torch

    from dml.build import build_run, load_data
    from dml.config import resolve
    from dml.trainer import Trainer

    device = torch.device(config.device if config.device != "auto" else "cpu")
    config = resolve(config, device.type)
    parts = build_run(config, load_data(config), device, dist=dist, log=lambda line: None)
    return Trainer(parts, config.output_dir, dist=dist, quiet=quiet)


def run_cli(module, *args, timeout=300, env=None):
    """``python -m MODULE ARGS`` in a subprocess from the repository root (one BLAS thread): the real command."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, status, needle=""):
    """The process ended with ``status`` and one ``error: …`` line on stderr containing ``needle``."""
    err = result.stderr
    assert result.returncode == status, (result.returncode, err[-600:])
    assert err.startswith("error: ") and err.count("\n") == 1, err[-600:]
    assert "Traceback" not in err and needle in err, err


def signal_after_first_epoch(train_args, out, signum, timeout=120):
    """Start ``python -m dml.train TRAIN_ARGS``, send ``signum`` once ``OUT/history.jsonl`` exists (an epoch is
    done), and return ``(exit status, stderr)``. The child starts with default signal handlers (a pytest-xdist
    worker may ignore SIGINT)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def default_handlers():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "dml.train", *map(str, train_args)], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_handlers)
    deadline = time.time() + timeout
    while not (out / "history.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err
