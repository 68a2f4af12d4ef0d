"""Benchmark: one hyperspherical-VAE step, at small and large batch: time and operations per call.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/small_batch.py [--batches 1 64 1024 65536]
        [--dims 3 10 64] [--dtype float32] [--rounds 7] [--block-seconds 0.05] [--libraries ...] [--compiled]

The step is what a VAE (or a Pyro model's guide) does per training step with a reparameterised latent:

    q = D(params); z = q.rsample(); loss = q.log_prob(z).sum() + KL(q ‖ prior).sum(); loss.backward()

with the parameters as leaf tensors that require gradients, for

* **vmf_dists**: ``VonMisesFisher(normalize(loc), κ)``, prior ``HypersphericalUniform(p)``;
* **Normal**: ``torch.distributions.Normal(loc, scale)``, prior ``Normal(0, 1)`` — what a Gaussian VAE pays;
* **PowerSpherical**: ``power_spherical.PowerSpherical(normalize(loc), κ)`` (PyPI ``power-spherical``),
  prior its ``HypersphericalUniform``;
* **s-vae**: the port of s-vae-pytorch's vMF in ``benchmarks/svae.py`` (KL = −H + log|S^{p−1}|).

κ is log-uniform in [1, 100] (both of our expansions are exercised), ``loc`` standard normal. Time per
call: for each library the mean over a block of calls lasting ~``--block-seconds``, the median over
``--rounds`` rounds, the libraries interleaved round by round (so that drifting machine load hits all of
them alike); one thread. Ops per call: the ATen operations dispatched in one step, forward and backward
(counted with a ``TorchDispatchMode``; a library's CPU work outside torch, e.g. scipy, is not counted).
Prints a markdown table; the last columns are the ratios to Normal and to PowerSpherical.

``--compiled`` adds **vmf_dists compiled**: the same loss under ``torch.compile`` (inductor, compiled once
per row before timing; its operations are not counted: fused kernels are not ATen operations).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.distributions import Normal, kl_divergence
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from svae import SvaeVonMisesFisher  # noqa: E402

from vmf_dists import HypersphericalUniform, VonMisesFisher  # noqa: E402

try:
    import power_spherical
except ImportError:  # the dev extra installs it
    power_spherical = None


def _normalize(loc: torch.Tensor) -> torch.Tensor:
    return loc / loc.norm(dim=-1, keepdim=True)


def make_steps(dim: int, batch: int, dtype: torch.dtype, seed: int = 0, compiled: bool = False) -> dict:
    """One closure per library that runs a full step on its own leaf parameters (with ``compiled``, also
    ours under ``torch.compile``: the forward compiled, its backward compiled by AOTAutograd)."""
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, dim, generator=gen, dtype=dtype).requires_grad_()
    kappa = torch.exp(torch.rand(batch, generator=gen, dtype=dtype) * math.log(100.0)).requires_grad_()
    scale = (torch.rand(batch, dim, generator=gen, dtype=dtype) + 0.5).requires_grad_()

    def our_loss(loc, kappa):
        q = VonMisesFisher(_normalize(loc), kappa)
        z = q.rsample()
        return q.log_prob(z).sum() + kl_divergence(q, HypersphericalUniform(dim, dtype=dtype)).sum()

    def ours():
        our_loss(loc, kappa).backward()

    if compiled:
        torch._dynamo.reset()  # a fresh compile per configuration (Dynamo stops recompiling a function after 8)
        validate = torch.distributions.Distribution._validate_args
        compiled_loss = torch.compile(our_loss)
        # Dynamo's first use turns torch.distributions' default validation off for the whole process; the
        # eager steps keep the default they are measured with otherwise
        torch.distributions.Distribution.set_default_validate_args(validate)

        def ours_compiled():
            compiled_loss(loc, kappa).backward()

    def normal():
        q = Normal(loc, scale)
        z = q.rsample()
        prior = Normal(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
        (q.log_prob(z).sum() + kl_divergence(q, prior).sum()).backward()

    def power():
        q = power_spherical.PowerSpherical(_normalize(loc), kappa)
        z = q.rsample()
        prior = power_spherical.HypersphericalUniform(dim, dtype=dtype)
        (q.log_prob(z).sum() + kl_divergence(q, prior).sum()).backward()

    def svae():
        q = SvaeVonMisesFisher(_normalize(loc), kappa.unsqueeze(-1))
        z = q.rsample()
        (q.log_prob(z).sum() + q.kl_to_uniform().sum()).backward()

    steps = {"vmf_dists": ours, "Normal": normal, "s-vae": svae}
    if compiled:
        steps["vmf_dists compiled"] = ours_compiled
    if power_spherical is not None:
        steps["PowerSpherical"] = power
    return steps


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_call(step) -> int | None:
    """ATen operations dispatched by one call (forward and backward), after a warm-up call; None for
    compiled code (its fused kernels are not ATen operations, and a dispatch mode would recompile it)."""
    if step.__name__.endswith("_compiled"):
        return None
    step()
    with _OpCounter() as counter:
        step()
    return counter.count


def time_per_call(steps: dict, rounds: int, block_seconds: float) -> dict:
    """Median over rounds of the mean time per call in a block; libraries interleaved within a round."""
    calls = {}
    for name, step in steps.items():  # warm up and size each library's block
        step()
        start = time.perf_counter()
        step()
        once = time.perf_counter() - start
        calls[name] = max(1, int(block_seconds / max(once, 1e-6)))
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                step()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


_OURS = ("vmf_dists", "vmf_dists compiled")


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f} ms" if ms < 1 else f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024, 65536])
    parser.add_argument("--dims", type=int, nargs="+", default=[3, 10, 64])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block-seconds", type=float, default=0.05)
    parser.add_argument("--libraries", nargs="+", default=None,
                        help="subset of: vmf_dists Normal PowerSpherical s-vae (and 'vmf_dists compiled')")
    parser.add_argument("--compiled", action="store_true",
                        help="also time our step under torch.compile (inductor; one compile per row, ~5-30 s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    ps = ""
    if power_spherical is not None:  # the package has no __version__
        ps = f", power-spherical {importlib.metadata.version('power-spherical')}"
    print(f"machine: {platform.machine()} CPU, {os.cpu_count()} cores, 1 thread; torch {torch.__version__}{ps}; "
          f"{args.dtype}; median of {args.rounds} rounds")
    print()
    names = None
    for dim in args.dims:
        for batch in args.batches:
            steps = make_steps(dim, batch, dtype, compiled=args.compiled)
            if args.libraries:
                steps = {k: v for k, v in steps.items() if k in args.libraries}
            if names is None:
                names = list(steps)
                header = " | ".join(f"{n} | ops" for n in names)
                ratios = " | ".join(f"{ours}/{n}" for ours in _OURS for n in names
                                    if ours in names and n in ("Normal", "PowerSpherical"))
                print(f"| p | batch | {header} | {ratios} |")
                print("|" + "---|" * (2 + 2 * len(names) + len(ratios.split(" | "))))
            ops = {name: ops_per_call(step) for name, step in steps.items()}
            times = time_per_call(steps, args.rounds, args.block_seconds)
            cells = " | ".join(f"{_fmt_ms(times[n])} | {'–' if ops[n] is None else ops[n]}" for n in names)
            ratio_cells = " | ".join(f"{times[ours] / times[n]:.2f}" for ours in _OURS for n in names
                                     if ours in names and n in ("Normal", "PowerSpherical"))
            print(f"| {dim} | {batch} | {cells} | {ratio_cells} |", flush=True)


if __name__ == "__main__":
    main()
