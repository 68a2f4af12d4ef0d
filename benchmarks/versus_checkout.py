"""Benchmark: the small-batch VAE step of `small_batch.py`, this checkout against another one, in one process.

    git worktree add /tmp/vmf-old <commit>
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/versus_checkout.py /tmp/vmf-old [--dims 3 10 64 512]
        [--batches 1 64 1024 65536] [--rounds 5] [--block-seconds 0.3]

Both versions of ``vmf_dists`` are imported side by side (each import under its own module objects) and the
same step — ``q = VonMisesFisher(normalize(loc), κ); z = q.rsample();
(q.log_prob(z).sum() + KL(q ‖ U).sum()).backward()``, float32, κ log-uniform in [1, 100] — is timed for
each, interleaved round by round, so that the drift of a shared machine's speed hits both alike. Prints a
markdown table: the median time per call of each, new/old, and the ATen operations per call of each.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from torch.distributions import kl_divergence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_batch import ops_per_call  # noqa: E402

_REPOSITORY = Path(__file__).resolve().parents[1]


def import_checkout(path: Path) -> ModuleType:
    """``vmf_dists`` from the checkout at ``path``, imported afresh (earlier imports are forgotten, not
    replaced: the modules already loaded keep working)."""
    for name in [name for name in sys.modules if name == "vmf_dists" or name.startswith("vmf_dists.")]:
        del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        module = importlib.import_module("vmf_dists")
    finally:
        sys.path.remove(str(path))
    if Path(module.__file__).resolve().parent != (path / "vmf_dists").resolve():
        raise SystemExit(f"{path} has no vmf_dists package (imported {module.__file__})")
    return module


def make_step(vmf_dists: ModuleType, dim: int, batch: int):
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(batch, dim, generator=gen).requires_grad_()
    kappa = torch.exp(torch.rand(batch, generator=gen) * math.log(100.0)).requires_grad_()

    def step() -> None:
        q = vmf_dists.VonMisesFisher(loc / loc.norm(dim=-1, keepdim=True), kappa)
        z = q.rsample()
        (q.log_prob(z).sum() + kl_divergence(q, vmf_dists.HypersphericalUniform(dim)).sum()).backward()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="the other checkout (a directory holding vmf_dists/)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024, 65536])
    parser.add_argument("--dims", type=int, nargs="+", default=[3, 10, 64, 512])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block-seconds", type=float, default=0.3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    versions = {"old": import_checkout(args.old.resolve()), "new": import_checkout(_REPOSITORY)}
    print(f"old: {args.old}, new: {_REPOSITORY}; torch {torch.__version__}, 1 thread; median of {args.rounds} rounds")
    print()
    print("| p | batch | old | new | new/old | ops old | ops new |")
    print("|---|---|---|---|---|---|---|")
    for dim in args.dims:
        for batch in args.batches:
            steps = {name: make_step(module, dim, batch) for name, module in versions.items()}
            ops = {name: ops_per_call(step) for name, step in steps.items()}
            start = time.perf_counter()
            steps["new"]()
            calls = max(2, int(args.block_seconds / max(time.perf_counter() - start, 1e-6)))
            samples: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        step()
                    samples[name].append((time.perf_counter() - start) / calls)
            old, new = (statistics.median(samples[name]) for name in ("old", "new"))
            print(f"| {dim} | {batch} | {old * 1e3:.3f} ms | {new * 1e3:.3f} ms | {new / old:.2f} | {ops['old']} | "
                  f"{ops['new']} |", flush=True)


if __name__ == "__main__":
    main()
