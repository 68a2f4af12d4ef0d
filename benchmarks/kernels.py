"""Benchmark: the pairwise vMF × nivMF expected likelihood (the dml loss kernel), forward + backward.

    .venv/bin/python benchmarks/kernels.py [--device cpu] [--dims 128 512] [--classes 100 1000 11318]
                                           [--batch 112] [--samples 5] [--repeats 3]
                                           [--max-naive-gb 4] [--loop-images 16] [--max-loop-gb 2]

B images are vMFs (direction and concentration per image), C class proxies are non-isotropic vMFs
(direction and a per-dimension concentration vector). Each variant computes the [B, C] matrix of
Monte-Carlo estimates log (1/S) Σ_s q_c(x_bs), x_bs ~ vMF_b (S reparameterised samples per image), then
the gradient of its sum with respect to all four parameter tensors (image locs and concentrations,
proxy locs and concentrations):

* ours: ``pairwise_log_expected_likelihood(VonMisesFisher(...), NonIsotropicVMF(...), num_samples=S)`` —
  θ_cᵀK_c x = x·(k_c²⊙μ_c) and ‖K_c x‖² = (x⊙x)·k_c² as two [S·B, p] × [p, C] matrix products;
* floor: sampling + those two matrix products + the minimal elementwise work
  (θᵀKx/‖Kx‖ − p log‖Kx‖) + logsumexp + backward, without the log-normaliser and the Σ log k terms —
  what any implementation of this kernel pays;
* naive: the same formula with broadcasting, x [S, B, 1, p] against the proxies [1, 1, C, p], i.e. an
  [S, B, C, p] tensor (written here only); skipped when that tensor would exceed --max-naive-gb;
* loop: the structure of the paper's reference code (Kirchhof et al., ECCV 2022): a Python loop over
  the images, each sampling S points and calling a per-image kernel that repeats the samples and the
  proxies into [S·C, p] tensors. To bound the run time and the memory (the autograd graph keeps every
  image's [S·C, p] tensors until the backward pass) it runs on the first n ≤ B images and its time and
  memory are scaled by B / n; the table says so.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the allocation before the call. On CPU,
the peak resident set size (VmHWM in /proc/self/status, reset through /proc/self/clear_refs) above the
RSS before the call, after ``gc.collect()`` and glibc ``malloc_trim(0)``; it counts every page touched by
tensors, autograd buffers and the allocator, so it is an upper bound on tensor memory (resolution a few
MB). Timings are the best of --repeats after one warm-up (fewer when one call takes more than
--budget-s; a warm-up slower than --budget-s is the only call); ratios compare runs in the same process
on the same inputs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import time

import torch

from vmf_dists import (
    NonIsotropicVMF,
    VonMisesFisher,
    log_expected_likelihood,
    mean_resultant_length,
    pairwise_log_expected_likelihood,
    vmf_log_normalizer,
)

# --------------------------------------------------------------------------------------------------
# the variants; all take (img_loc [B, p], img_kappa [B], proxy_loc [C, p], proxy_conc [C, p], S)
# and return the [B, C] matrix of log-mean-exp estimates


def ours(img_loc, img_kappa, proxy_loc, proxy_conc, samples: int) -> torch.Tensor:
    p = VonMisesFisher(img_loc, img_kappa, validate_args=False)
    q = NonIsotropicVMF(proxy_loc, proxy_conc, validate_args=False)
    return pairwise_log_expected_likelihood(p, q, num_samples=samples)


def gemm_floor(img_loc, img_kappa, proxy_loc, proxy_conc, samples: int) -> torch.Tensor:
    batch, dim = img_loc.shape
    x = VonMisesFisher(img_loc, img_kappa, validate_args=False).rsample((samples,)).reshape(samples * batch, dim)
    k2 = proxy_conc.square()
    dot = x @ (k2 * proxy_loc).T  # θ_cᵀK_c x, [S·B, C]
    sq = x.square() @ k2.T  # ‖K_c x‖², [S·B, C]
    logp = dot * sq.rsqrt() - (0.5 * dim) * sq.log()
    return torch.logsumexp(logp.view(samples, batch, -1), dim=0) - math.log(samples)


def naive(img_loc, img_kappa, proxy_loc, proxy_conc, samples: int) -> torch.Tensor:
    dim = img_loc.shape[-1]
    x = VonMisesFisher(img_loc, img_kappa, validate_args=False).rsample((samples,))  # [S, B, p]
    theta = proxy_conc * proxy_loc  # [C, p]
    kx = x[:, :, None, :] * proxy_conc[None, None]  # [S, B, C, p]
    kx_norm = torch.linalg.vector_norm(kx, dim=-1)  # [S, B, C]
    dot = (kx * theta).sum(-1)  # [S, B, C]
    logp = (
        vmf_log_normalizer(dim, torch.linalg.vector_norm(theta, dim=-1))
        + dot / kx_norm
        + proxy_conc.log().sum(-1)
        - dim * kx_norm.log()
    )
    return torch.logsumexp(logp, dim=0) - math.log(samples)


def _paper_style_image_kernel(x, proxy_loc, proxy_conc) -> torch.Tensor:
    """One image's S samples x [S, p] against all C proxies, the reference code's way: [S·C, p] tensors."""
    samples, dim = x.shape
    classes = proxy_loc.shape[0]
    xs = x.repeat_interleave(classes, dim=0)  # [S·C, p]
    ks = proxy_conc.repeat(samples, 1)  # [S·C, p]
    mus = proxy_loc.repeat(samples, 1)  # [S·C, p]
    thetas = ks * mus
    kx = ks * xs
    kx_norm = kx.norm(dim=-1)
    logp = (
        vmf_log_normalizer(dim, thetas.norm(dim=-1)) + (thetas * kx).sum(-1) / kx_norm + ks.log().sum(-1)
        - dim * kx_norm.log()
    )
    return torch.logsumexp(logp.view(samples, classes), dim=0) - math.log(samples)


def per_image_loop(img_loc, img_kappa, proxy_loc, proxy_conc, samples: int) -> torch.Tensor:
    rows = []
    for b in range(img_loc.shape[0]):
        x = VonMisesFisher(img_loc[b], img_kappa[b], validate_args=False).rsample((samples,))  # [S, p]
        rows.append(_paper_style_image_kernel(x, proxy_loc, proxy_conc))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------------
# the Jensen bias of the S-sample estimate, where the exact value is known


def jensen_bias_check(dim: int, samples: int, device: torch.device, repeats: int = 20000) -> list[str]:
    """Mean error of the S-sample estimate against the closed form, for isotropic proxies k = c·1.

    NonIsotropicVMF(μ_q, c·1) is vMF(μ_q, c), so log EL is exact (closed form), and so is the delta-method
    bias −Var[q(x)]/(2S E[q(x)]²): E_p[q²] = C_p(c)²/C_p(2c) · EL(p, vMF(μ_q, 2c)). ``repeats`` independent
    estimates (a batch of identical image vMFs) give the measured mean error and its standard error.
    """
    f64 = torch.float64
    mu_p = torch.zeros(dim, dtype=f64, device=device)
    mu_p[0] = 1.0
    kappa_p = 100.0
    rows = []
    a_p = mean_resultant_length(dim, torch.tensor(kappa_p, dtype=f64)).item()
    for c, cos in [(5.0, 1.0), (20.0, 1.0), (50.0, 1.0), (200.0, 0.9)]:
        mu_q = torch.zeros(dim, dtype=f64, device=device)
        mu_q[0], mu_q[1] = cos, math.sqrt(1 - cos * cos)
        p_one = VonMisesFisher(mu_p, torch.tensor(kappa_p, dtype=f64, device=device))
        exact = log_expected_likelihood(p_one, VonMisesFisher(mu_q, torch.tensor(c, dtype=f64, device=device))).item()
        log_e_q2 = (
            2 * vmf_log_normalizer(dim, torch.tensor(c, dtype=f64)).item()
            - vmf_log_normalizer(dim, torch.tensor(2 * c, dtype=f64)).item()
            + log_expected_likelihood(p_one, VonMisesFisher(mu_q, torch.tensor(2 * c, dtype=f64, device=device))).item()
        )
        rel_var = math.expm1(log_e_q2 - 2 * exact)
        # E[log q] − log E[q]
        s1_bias = vmf_log_normalizer(dim, torch.tensor(c, dtype=f64)).item() + c * a_p * cos - exact
        predicted = -rel_var / (2 * samples)
        p_many = VonMisesFisher(mu_p.expand(repeats, dim), torch.full((repeats,), kappa_p, dtype=f64, device=device))
        q = NonIsotropicVMF(mu_q[None], torch.full((1, dim), c, dtype=f64, device=device))
        with torch.no_grad():
            est = pairwise_log_expected_likelihood(p_many, q, num_samples=samples)[:, 0]
        err = est - exact
        rows.append(
            f"| {kappa_p:g} | {c:g} | {cos:g} | {exact:.3f} | {rel_var:.3g} | {predicted:+.3g} | "
            f"{err.mean().item():+.4f} ± {err.std().item() / math.sqrt(repeats):.4f} | {s1_bias:+.3f} | "
            f"{err.std().item():.3f} |"
        )
    return rows


# --------------------------------------------------------------------------------------------------
# measurement


class PeakMemory:
    """Peak memory of one call above the memory in use before it (bytes); see the module docstring."""

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = None
        if device.type == "cpu":
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self.libc = None
            with open("/proc/self/clear_refs", "w") as f:  # fail early where the kernel refuses
                f.write("5")

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")

    def measure(self, fn):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - start
            del out
            return elapsed, torch.cuda.max_memory_allocated(self.device) - base
        if self.libc is not None:
            self.libc.malloc_trim(0)
        base = self._status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
        peak = self._status_kb("VmHWM")
        del out
        return elapsed, (peak - base) * 1024


def timed_with_memory(fn, repeats: int, budget_s: float, meter: PeakMemory, sync) -> tuple[float, int]:
    """(best time, peak memory): one warm-up, one measured call (time and memory), then more timed calls
    while the total stays under ``budget_s``. A warm-up slower than ``budget_s`` is the only call (its time
    and memory are reported; one-time costs are negligible at that size)."""
    warm_time, warm_mem = meter.measure(fn)
    if warm_time > budget_s:
        return warm_time, warm_mem
    best, mem = meter.measure(fn)
    spent = warm_time + best
    for _ in range(repeats - 1):
        if spent > budget_s:
            break
        start = time.perf_counter()
        out = fn()
        sync()
        elapsed = time.perf_counter() - start
        del out
        spent += elapsed
        best = min(best, elapsed)
    return best, mem


def fwd_bwd(variant, leaves, samples: int):
    def run():
        value = variant(*leaves, samples)
        grads = torch.autograd.grad(value.sum(), leaves)
        return value.detach(), grads

    return run


def fmt_time(t: float) -> str:
    return f"{t * 1e3:.0f} ms" if t >= 0.1 else f"{t * 1e3:.1f} ms"


def fmt_bytes(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{max(n, 0) / 1e6:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 11318])
    parser.add_argument("--batch", type=int, default=112)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=4.0, help="stop repeating a variant after this much time")
    parser.add_argument("--max-naive-gb", type=float, default=4.0,
                        help="skip naive when its [S,B,C,p] tensor is larger")
    parser.add_argument("--loop-images", type=int, default=16,
                        help="images the per-image loop runs on (then scaled to B)")
    parser.add_argument("--max-loop-gb", type=float, default=2.0,
                        help="fewer loop images when ~8 [S·C,p] tensors per image exceed this")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-bias-check", action="store_true", help="skip the Jensen-bias table")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: leave as set)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    meter = PeakMemory(device)
    elem = torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mem_note = "peak memory: torch.cuda.max_memory_allocated above the allocation before the call"
    else:
        name = f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
        mem_note = "peak memory: peak RSS (VmHWM) above the RSS before the call, after gc + malloc_trim"
    B, S = args.batch, args.samples
    print(f"device: {name}; torch {torch.__version__}; B = {B} images, S = {S} samples, {args.dtype}; "
          "forward + backward")
    print(f"best of {args.repeats} after a warm-up (fewer when a call takes > {args.budget_s:g} s, a single call "
          f"when the warm-up does); {mem_note}")
    print()
    print("| p | C | ours | ours mem | floor | ours/floor | naive | naive mem | naive/ours | loop (n imgs) | "
          "loop mem | loop/ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    checks = []
    for dim in args.dims:
        for classes in args.classes:
            gen = torch.Generator().manual_seed(1000 * dim + classes)
            img_loc = torch.randn(B, dim, generator=gen, dtype=torch.float64)
            img_loc = (img_loc / img_loc.norm(dim=-1, keepdim=True)).to(device, dtype).requires_grad_(True)
            img_kappa = (20 + 180 * torch.rand(B, generator=gen, dtype=torch.float64)).to(device, dtype)
            img_kappa = img_kappa.requires_grad_(True)
            proxy_loc = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
            proxy_loc = (proxy_loc / proxy_loc.norm(dim=-1, keepdim=True)).to(device, dtype).requires_grad_(True)
            proxy_conc = torch.exp(math.log(5.0) + 0.5 * torch.randn(classes, dim, generator=gen, dtype=torch.float64))
            proxy_conc = proxy_conc.to(device, dtype).requires_grad_(True)
            leaves = [img_loc, img_kappa, proxy_loc, proxy_conc]

            t_ours, m_ours = timed_with_memory(fwd_bwd(ours, leaves, S), args.repeats, args.budget_s, meter, sync)
            t_floor, _ = timed_with_memory(fwd_bwd(gemm_floor, leaves, S), args.repeats, args.budget_s, meter, sync)

            naive_bytes = S * B * classes * dim * elem
            t_naive = None
            if naive_bytes > args.max_naive_gb * 1e9:
                naive_cells = [f"skipped ({naive_bytes / 1e9:.0f} GB)", "–", "–"]
            else:
                try:
                    t_naive, m_naive = timed_with_memory(
                        fwd_bwd(naive, leaves, S), args.repeats, args.budget_s, meter, sync
                    )
                except torch.cuda.OutOfMemoryError:  # its peak is ~4× the [S,B,C,p] tensor
                    naive_cells = [f"out of memory ({naive_bytes / 1e9:.0f} GB tensor)", "–", "–"]
                    torch.cuda.empty_cache()
            if t_naive is not None:
                naive_cells = [fmt_time(t_naive), fmt_bytes(m_naive), f"{t_naive / t_ours:.1f}×"]
                # same seed, same draws (both sample S × [B] from the same vMFs first): the estimates agree
                torch.manual_seed(7)
                v_ours = ours(*leaves, S).detach()
                torch.manual_seed(7)
                v_naive = naive(*leaves, S).detach()
                checks.append((dim, classes, (v_ours - v_naive).abs().max().item(), v_naive.abs().max().item()))

            per_image = 8 * S * classes * dim * elem  # ~8 [S·C, p] tensors per image live until backward
            n_loop = max(1, min(B, args.loop_images, int(args.max_loop_gb * 1e9 // per_image)))
            sub = [
                img_loc[:n_loop].detach().requires_grad_(True), img_kappa[:n_loop].detach().requires_grad_(True),
                proxy_loc, proxy_conc,
            ]
            t_loop, m_loop = timed_with_memory(
                fwd_bwd(per_image_loop, sub, S), args.repeats, args.budget_s, meter, sync
            )
            scale = B / n_loop
            t_loop, m_loop = t_loop * scale, m_loop * scale
            loop_label = f"{fmt_time(t_loop)} ({n_loop})" if n_loop < B else f"{fmt_time(t_loop)} (all)"
            print(
                f"| {dim} | {classes} | {fmt_time(t_ours)} | {fmt_bytes(m_ours)} | {fmt_time(t_floor)} | "
                f"{t_ours / t_floor:.2f} | "
                + " | ".join(naive_cells)
                + f" | {loop_label} | {fmt_bytes(m_loop)} | {t_loop / t_ours:.0f}× |",
                flush=True,
            )
    print()
    print(f"loop: run on n of the {B} images (in brackets); its time and memory are scaled by {B}/n.")
    print("naive skipped: the size of its [S, B, C, p] tensor alone is given.")
    for dim, classes, diff, scale in checks:
        print(f"check p={dim} C={classes}: max |ours − naive| = {diff:.2e} on the same draws (max |value| {scale:.1f})")
    if not args.no_bias_check:
        dim = args.dims[0]
        print()
        print(f"Jensen bias of the S = {S} estimate, p = {dim}, float64, 20000 estimates per row; "
              "proxies k = c·1 (= vMF(μ_q, c)),")
        print("rel. var = Var[q(x)]/E[q(x)]², predicted = −rel. var/(2S) (delta method), "
              "measured = mean(estimate − exact) ± s.e.,")
        print("S = 1 bias = E[log q(x)] − log E[q(x)] (the bias of a single sample; "
              "the mean estimate rises with S from it to 0)")
        print()
        print("| κ image | c proxy | μ_pᵀμ_q | exact log EL | rel. var | predicted bias | measured bias | S = 1 bias | "
              "sd of estimate |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in jensen_bias_check(dim, S, device):
            print(row, flush=True)


if __name__ == "__main__":
    main()
