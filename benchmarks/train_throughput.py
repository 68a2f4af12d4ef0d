"""Benchmark: images/s of a full dml training step and the loss's share of it (CUDA; CPU for smoke runs).

    .venv/bin/python benchmarks/train_throughput.py [--device cuda] [--backbones efficientnet_lite0 resnet50]
        [--losses el_nivmf el_nivmf_paper proxy_anchor] [--dims 128 512] [--classes 100 1000 11318]
        [--batch-size 112] [--resolution 224] [--samples 5] [--steps 30] [--warmup 10]
        [--paper-loop {all,off}] [--loop-images 0] [--loop-repeats 3] [--json PATH] [--quick]

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_throughput.py --device cpu --quick   # smoke, < 1 min

A step is what `dml.train` does per batch on the fine-tuning path: synthetic uint8 images already on the
device (the benchmark measures compute, not the data pipeline) converted to float in [0, 1], the backbone
and the embedding head (`dml.models.build_model(name, p, weights=None)`, random init, frozen BatchNorm
statistics as in the trainer) under bf16 autocast on CUDA (float32 on CPU; ``--amp``), channels_last, the
loss (`dml.losses.build_loss`; the losses upcast to float32/float64 and switch autocast off themselves),
``zero_grad(set_to_none=True)``, backward, and one AdamW step over the model's groups (weight decay 1e-4,
head lr × 10) and the loss's ``param_groups`` (no weight decay) — the trainer's `build_optimizer`. The
head's output scale is calibrated to the loss's initial norm (2.5p for the vMF losses) as the trainer
does. Batches are class-balanced (2 images per class; the sampler's default), torch.distributions'
argument validation is off (as in the trainer's loop: no label-range sync).

Measured per cell (backbone, p, C, loss):

* step ms: median of --steps full steps after --warmup steps. On CUDA each step is bracketed by CUDA
  events (so a step that waits on the host counts its gaps), on CPU by ``time.perf_counter``;
* loss ms: median of --steps calls of the loss alone, forward + backward, on the same embeddings (the
  model's bf16 output for this batch, detached, ``requires_grad``), after --warmup calls;
* share = loss ms / step ms; img/s = batch / step ms;
* syncs/step (CUDA): host synchronisations counted in one warm-up step with
  ``torch.cuda.set_sync_debug_mode("warn")`` (e.g. a rejection sampler's ``bool(done.all())``);
* peak mem (CUDA): ``torch.cuda.max_memory_allocated`` over the cell's timed steps (model, AdamW state,
  activations, loss); loss mem: the peak of the loss alone above what was allocated before it.

Anchor, per (p, C): the paper's loss as its reference code computes it (Kirchhof et al., ECCV 2022;
ExplainableML/Probabilistic_Deep_Metric_Learning, ``criteria/proxyvmf_panc.py`` with
``utilities/misc.py::log_ppk_vmf_vec``, mode 'new', the cross-entropy branch, no proxy subsampling,
ProxyAnchor guidance): a Python loop over the B images, each drawing S samples and building
``[S·C, p]`` tensors against all proxies; here with `vmf_dists.VonMisesFisher.rsample` in place of the
s-vae sampler (the point is the loop's cost, not the sampler's). Timed like "loss ms" (median of
--loop-repeats after one warm-up call); its step is *implied*: the cell's network time (el_nivmf's step
ms − loss ms) + the loop's ms. With --loop-images n < B the loop runs on the first n images and its time
and memory are scaled by B/n (also done automatically, halving n, when the full batch runs out of
memory); the table says so.

The issue's target (H100/H200): el_nivmf ≤ 10% of a ResNet-50 bf16 step at C = 11318, p = 512, S = 5;
the last lines print that check with the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dml.losses import build_loss  # noqa: E402
from dml.losses.el_nivmf_paper import paper_log_normalizer  # noqa: E402
from dml.models import build_model  # noqa: E402
from vmf_dists import VonMisesFisher  # noqa: E402

LR, HEAD_LR_MULT, WEIGHT_DECAY, PER_CLASS = 1e-4, 10.0, 1e-4, 2  # the trainer's defaults
TARGET = {"backbone": "resnet50", "embed_dim": 512, "num_classes": 11318, "loss": "el_nivmf", "share": 0.10}


# --------------------------------------------------------------------------------------------------
# the anchor: the paper's per-image loop (criteria/proxyvmf_panc.py + utilities/misc.py::log_ppk_vmf_vec)


def paper_log_ppk_vmf_vec(mu1, kappa1, mu2, kappa2, p, temp, n_samples):
    """``log_ppk_vmf_vec`` of the reference code for one image against all proxies (mode 'new').

    mu1 [p], kappa1 [] (one image); mu2 [C, p] unit directions, kappa2 [C, p] per-dimension concentrations.
    Returns [C]: log (1/S) Σ_s exp(ℓ_c(x_s)/T), ℓ_c(x) = log C_p(‖θ_c‖) + ‖θ_c‖ cos(x, θ_c) + Σ log k_c − log ‖θ_c‖.
    """
    if mu1.dim() == 1:
        mu1 = mu1.unsqueeze(0)
    if kappa1.dim() == 0:
        kappa1 = kappa1.unsqueeze(0).unsqueeze(1)
    mu1 = F.normalize(mu1, dim=1)
    mu2 = F.normalize(mu2, dim=1)
    # the reference draws with s-vae's VonMisesFisher(loc=[1, p], scale=[1, 1]); ours takes κ of shape [1]
    samples = VonMisesFisher(mu1, kappa1.squeeze(-1), validate_args=False).rsample(torch.Size([n_samples]))
    if mu1.shape[0] == 1:
        samples = samples.expand(n_samples, mu2.shape[0], mu1.shape[1])
    samples = samples.reshape((-1, samples.shape[2]))  # [S·C, p] (a copy)
    mu2 = mu2 * kappa2
    norm_mu2 = torch.norm(mu2, dim=1)
    mu2 = mu2.unsqueeze(0).expand(n_samples, -1, -1).reshape((-1, mu2.shape[1]))  # [S·C, p] (a copy)
    cos_sim = F.cosine_similarity(samples, mu2).unsqueeze(1)
    cos_sim = cos_sim.reshape((n_samples, -1, 1))
    logcp = paper_log_normalizer(p, norm_mu2)  # approx_log_cp(·, p, mode='new')
    detterm = torch.sum(torch.log(kappa2), dim=1) - torch.log(norm_mu2)
    logl = (
        logcp.unsqueeze(0).unsqueeze(2) + norm_mu2.unsqueeze(0).unsqueeze(2) * cos_sim
        + detterm.unsqueeze(0).unsqueeze(2)
    )
    logl = logl / temp
    one_over_n = torch.log(torch.ones(1) * n_samples).to(logl.device)  # a host-to-device copy per image, as there
    logl = logl - one_over_n
    logl = torch.logsumexp(logl, dim=0)
    return logl.squeeze(logl.dim() - 1)


class PaperLoopLoss(torch.nn.Module):
    """The reference criterion ``proxyvmf_panc.Criterion`` (subsample_p = 1, bindev off, guidance on)."""

    def __init__(self, num_classes: int, embed_dim: int, samples: int = 5, concentration: float = 10.0,
                 temperature: float = 0.003, guidance_w: float = 1.0):
        super().__init__()
        self.samples = samples
        self.weight_v = torch.nn.Parameter(torch.randn(num_classes, embed_dim) * concentration / math.sqrt(embed_dim))
        self.kappa = torch.nn.Parameter(torch.full((num_classes, embed_dim), concentration))
        self.temp = torch.nn.Parameter(torch.ones(1) * temperature)
        self.register_buffer("class_idxs", torch.arange(num_classes))
        self.guidance_w = guidance_w
        self.pos_alpha, self.neg_alpha, self.pos_delta, self.neg_delta = 32.0, 32.0, 0.1, -0.1

    def forward(self, batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = batch.float()  # the reference trains in float32
        proxy_normed = F.normalize(self.weight_v, dim=-1)
        kappa_pos = torch.maximum(self.kappa, torch.ones(1).to(batch.device) * 0.1)
        batch_v = F.normalize(batch, dim=1)
        batch_g = torch.norm(batch, dim=1)
        sim_to_proxies = torch.stack([
            paper_log_ppk_vmf_vec(batch_v[i, :], batch_g[i], proxy_normed, kappa_pos, batch.shape[-1], self.temp,
                                  self.samples)
            for i in torch.arange(batch_v.shape[0])
        ])
        loss = torch.mean(-sim_to_proxies[range(len(batch)), labels] + torch.logsumexp(sim_to_proxies, dim=1))
        if self.guidance_w:
            loss = loss + self.guidance_w * self.oproxy(batch_v, labels)
        return loss

    def oproxy(self, batch, labels):
        same_labels = labels.view(1, -1) == labels.view(-1, 1)
        diff_labels = labels.view(-1, 1) != self.class_idxs.unsqueeze(0)
        proxies = F.normalize(self.weight_v, dim=-1)
        pos_sims = batch.mm(proxies[labels].T)
        sims = batch.mm(proxies.T)
        w_pos_sims = -self.pos_alpha * (pos_sims - self.pos_delta)
        w_neg_sims = self.neg_alpha * (sims - self.neg_delta)
        pos_s = self._masked_bindev_logsumexp(w_pos_sims, mask=same_labels, dim=0)
        neg_s = self._masked_bindev_logsumexp(w_neg_sims, mask=diff_labels, dim=0)
        return pos_s.mean() + neg_s.mean()

    @staticmethod
    def _masked_bindev_logsumexp(sims, dim, mask):
        sims = sims.masked_fill(~mask, torch.finfo(sims.dtype).min)
        dims = list(sims.shape)
        dims[dim] = 1
        sims = torch.cat([sims, torch.zeros(dims, dtype=sims.dtype, device=sims.device)], dim=dim)
        out = torch.logsumexp(sims, dim=dim, keepdim=True)
        return out.masked_fill(~torch.any(mask, dim=dim, keepdim=True), 0)


# --------------------------------------------------------------------------------------------------
# timing


class Clock:
    """Per-call times (ms) and peak memory; CUDA events on CUDA, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def times(self, fn, n: int) -> list[float]:
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            self.sync()
            return [start.elapsed_time(end) for start, end in events]
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def reset_peak(self) -> int:
        """Reset the peak counter; returns the bytes allocated now (CUDA; 0 on the CPU)."""
        if not self.cuda:
            return 0
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int | None:
        if not self.cuda:
            return None
        self.sync()
        return torch.cuda.max_memory_allocated(self.device)

    def count_syncs(self, fn) -> int | None:
        """Host synchronisations during one call of fn (CUDA; None on the CPU)."""
        if not self.cuda:
            fn()
            return None
        self.sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        self.sync()
        return sum("synchroniz" in str(w.message) for w in caught)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# a cell: one (backbone, p, C, loss)


def class_balanced_labels(batch: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    groups = max(1, batch // PER_CLASS)
    if num_classes >= groups:
        classes = torch.randperm(num_classes, generator=gen)[:groups]
    else:
        classes = torch.randint(num_classes, (groups,), generator=gen)
    labels = classes.repeat_interleave(PER_CLASS)
    if labels.numel() < batch:
        labels = torch.cat([labels, torch.randint(num_classes, (batch - labels.numel(),), generator=gen)])
    return labels[:batch]


def loss_options(name: str, samples: int) -> dict:
    return {"num_samples": samples} if name == "el_nivmf" else {}


def make_optimizer(model, loss) -> torch.optim.Optimizer:
    """The trainer's build_optimizer with its defaults: AdamW, network groups with weight decay, loss groups without."""
    groups = model.parameter_groups(LR, head_lr_mult=HEAD_LR_MULT)
    for g in groups:
        g["weight_decay"] = WEIGHT_DECAY
    for g in loss.param_groups(LR):
        groups.append({**g, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=LR)


def run_cell(model, images_u8, labels, loss_name, num_classes, dim, args, clock, amp) -> dict:
    device = images_u8.device
    options = loss_options(loss_name, args.samples)
    loss = build_loss(loss_name, num_classes=num_classes, embed_dim=dim, **options).to(device)
    loss.train()

    def to_float():
        return images_u8.float().div_(255.0)  # keeps channels_last

    with torch.no_grad(), amp():
        features = model.features(to_float()).float()
    target = loss.initial_norm_per_dim * dim
    if target > 0:
        model.calibrate_head(features, target)
    else:
        model.output_scale.fill_(1.0)
    optimizer = make_optimizer(model, loss)
    holder: dict[str, torch.Tensor] = {}

    # loss, optimizer and holder are bound as defaults (not closed over): the `del` below then drops the
    # functions and with them the last references, so free_memory can release the cell's memory
    def step(loss=loss, optimizer=optimizer, holder=holder):
        with amp():
            embeddings = model(to_float())
            value = loss(embeddings, labels)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        holder["value"] = value

    base = clock.reset_peak()
    for _ in range(max(args.warmup - 1, 0)):
        step()
    syncs = clock.count_syncs(step)  # the last warm-up step
    clock.reset_peak()  # the peak of the timed steps, without cuDNN's autotuning workspaces of the warm-up
    step_ms = clock.times(step, args.steps)
    peak = clock.peak()
    final_value = float(holder["value"].detach())

    with torch.no_grad(), amp():
        emb = model(to_float()).detach()

    def loss_only(loss=loss):
        e = emb.detach().requires_grad_(True)
        with amp():
            value = loss(e, labels)
        loss.zero_grad(set_to_none=True)
        value.backward()

    optimizer.zero_grad(set_to_none=True)
    free_memory(device)
    before = clock.reset_peak()
    for _ in range(args.warmup):
        loss_only()
    loss_ms = clock.times(loss_only, args.steps)
    loss_peak = clock.peak()
    del step, loss_only, optimizer, loss, holder
    free_memory(device)
    step_med, loss_med = median(step_ms), median(loss_ms)
    return {
        "loss": loss_name, "embed_dim": dim, "num_classes": num_classes,
        "step_ms": step_med, "step_ms_mean": statistics.fmean(step_ms), "loss_ms": loss_med,
        "share": loss_med / step_med, "images_per_s": images_u8.shape[0] / (step_med / 1e3),
        "syncs_per_step": syncs, "peak_bytes": peak,
        "loss_peak_bytes": None if loss_peak is None else loss_peak - before,
        "state_bytes": base, "final_loss": final_value, "finite": math.isfinite(final_value),
    }


def run_paper_loop(emb, labels, num_classes, dim, args, clock) -> dict:
    """The reference loop's loss forward + backward on detached embeddings [B, p]; scaled when run on n < B images."""
    device = emb.device
    batch = emb.shape[0]
    n = batch if args.loop_images <= 0 else min(batch, args.loop_images)
    while True:
        free_memory(device)
        torch.manual_seed(0)
        loss = PaperLoopLoss(num_classes, dim, samples=args.samples).to(device)
        sub_emb, sub_labels = emb[:n].detach(), labels[:n]

        def call(loss=loss, sub_emb=sub_emb, sub_labels=sub_labels):  # bound now: `del` below frees the loss
            e = sub_emb.detach().requires_grad_(True)
            value = loss(e, sub_labels)
            loss.zero_grad(set_to_none=True)
            value.backward()

        try:
            before = clock.reset_peak()
            syncs = clock.count_syncs(call)  # the warm-up call
            ms = clock.times(call, args.loop_repeats)
            peak = clock.peak()
            break
        except torch.cuda.OutOfMemoryError:
            del call, loss
            if n == 1:
                raise
            n = max(1, n // 2)
            print(f"(paper loop at p={dim}, C={num_classes}: out of memory; retrying on {n} images, scaled)",
                  file=sys.stderr, flush=True)
    del call, loss
    free_memory(device)
    scale = batch / n
    return {
        "embed_dim": dim, "num_classes": num_classes, "images": n, "scale": scale,
        "loss_ms": median(ms) * scale, "loss_ms_runs": [t * scale for t in ms],
        "loss_peak_bytes": None if peak is None else (peak - before) * scale,
        "syncs_per_step": None if syncs is None else syncs * scale,
    }


# --------------------------------------------------------------------------------------------------
# output


def fmt_ms(t: float) -> str:
    return f"{t:.0f}" if t >= 100 else (f"{t:.1f}" if t >= 10 else f"{t:.2f}")


def fmt_gb(n) -> str:
    return "–" if n is None else f"{n / 2**30:.2f} GiB"


def fmt_syncs(s) -> str:
    return "–" if s is None else f"{s:.0f}"


def table(results: list[dict], anchors: dict, batch: int) -> list[str]:
    lines = ["| backbone | p | C | loss | loss ms | step ms | loss share | img/s | syncs/step | peak mem | loss mem |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['backbone']} | {r['embed_dim']} | {r['num_classes']} | {r['loss']} | {fmt_ms(r['loss_ms'])} | "
            f"{fmt_ms(r['step_ms'])} | {100 * r['share']:.1f}% | {r['images_per_s']:.0f} | "
            f"{fmt_syncs(r['syncs_per_step'])} | "
            f"{fmt_gb(r['peak_bytes'])} | {fmt_gb(r['loss_peak_bytes'])} |"
        )
        if r.get("anchor_after"):
            a = anchors[(r["embed_dim"], r["num_classes"])]
            net = r["net_ms"]
            step = net + a["loss_ms"]
            label = "paper loop" + ("" if a["images"] == batch else f" ({a['images']}/{batch} imgs, scaled)")
            lines.append(
                f"| {r['backbone']} | {r['embed_dim']} | {r['num_classes']} | {label} | {fmt_ms(a['loss_ms'])} | "
                f"≈{fmt_ms(step)}* | {100 * a['loss_ms'] / step:.1f}%* | {batch / (step / 1e3):.0f}* | "
                f"{fmt_syncs(a['syncs_per_step'])} | – | {fmt_gb(a['loss_peak_bytes'])} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbones", nargs="+", default=None, help="default: efficientnet_lite0 resnet50")
    parser.add_argument("--losses", nargs="+", default=None, help="default: el_nivmf el_nivmf_paper proxy_anchor")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="default: 128 512")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="default: 100 1000 11318")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 112")
    parser.add_argument("--resolution", type=int, default=None, help="default: 224")
    parser.add_argument("--samples", type=int, default=5, help="Monte-Carlo samples S of el_nivmf and the paper loop")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per cell, median reported (default 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10)")
    parser.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="auto: bf16 on CUDA, off on CPU")
    parser.add_argument("--paper-loop", choices=["all", "off"], default="all",
                        help="time the paper's per-image loop at every (p, C) of the grid (once each)")
    parser.add_argument("--loop-images", type=int, default=0, help="images the paper loop runs on (0: the whole batch)")
    parser.add_argument("--loop-repeats", type=int, default=None, help="timed calls of the paper loop (default 3)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in float32 matrix products (default: off)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: leave as set)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny backbone, p=32, C=100, batch 16 at 32 px, 2 steps (flags given win)")
    args = parser.parse_args()
    full = {"backbones": ["efficientnet_lite0", "resnet50"], "losses": ["el_nivmf", "el_nivmf_paper", "proxy_anchor"],
            "dims": [128, 512], "classes": [100, 1000, 11318], "batch_size": 112, "resolution": 224,
            "steps": 30, "warmup": 10, "loop_repeats": 3}
    quick = {"backbones": ["tiny"], "dims": [32], "classes": [100], "batch_size": 16, "resolution": 32,
             "steps": 2, "warmup": 1, "loop_repeats": 1}
    for key, value in full.items():
        if getattr(args, key) is None:
            setattr(args, key, quick.get(key, value) if args.quick else value)
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 2 or args.loop_repeats < 1:
        parser.error("--steps, --warmup, --loop-repeats must be >= 1 and --batch-size >= 2")

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.distributions.Distribution.set_default_validate_args(False)  # as the trainer's loop: no syncs
    amp_dtype = torch.bfloat16 if (args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")) else None
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        name = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}")
    else:
        name = f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"

    def amp():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    clock = Clock(device)
    B, R = args.batch_size, args.resolution
    print(f"device: {name}; torch {torch.__version__}; Python {platform.python_version()}")
    print(f"batch {B}, {R}×{R} synthetic uint8 images on the device, channels_last, "
          f"{'bf16 autocast' if amp_dtype else 'float32'}, S = {args.samples}, "
          f"AdamW (lr {LR:g}, head ×{HEAD_LR_MULT:g}, wd {WEIGHT_DECAY:g}), "
          f"cudnn.benchmark {device.type == 'cuda' and not args.no_cudnn_benchmark}, tf32 {args.tf32}")
    print(f"median of {args.steps} steps after {args.warmup} warm-up steps "
          f"({'CUDA events' if device.type == 'cuda' else 'perf_counter'}); paper loop: median of {args.loop_repeats} "
          f"after 1 warm-up", flush=True)

    results: list[dict] = []
    anchors: dict[tuple[int, int], dict] = {}
    t_start = time.perf_counter()
    for backbone in args.backbones:
        for dim in args.dims:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "random weights" warnings: random init is the point here
                model = build_model(backbone, dim, weights=None)
            model = model.to(device).to(memory_format=torch.channels_last)
            model.train()
            gen = torch.Generator().manual_seed(dim)
            images_u8 = torch.randint(0, 256, (B, 3, R, R), dtype=torch.uint8, generator=gen)
            images_u8 = images_u8.to(device).contiguous(memory_format=torch.channels_last)
            for classes in args.classes:
                labels = class_balanced_labels(B, classes, gen).to(device)
                group = []
                for loss_name in args.losses:
                    t0 = time.perf_counter()
                    r = run_cell(model, images_u8, labels, loss_name, classes, dim, args, clock, amp)
                    r.update(backbone=backbone, wall_s=time.perf_counter() - t0)
                    group.append(r)
                    results.append(r)
                    print(f"  {backbone} p={dim} C={classes} {loss_name}: step {fmt_ms(r['step_ms'])} ms, "
                          f"loss {fmt_ms(r['loss_ms'])} ms ({100 * r['share']:.1f}%), {r['images_per_s']:.0f} img/s, "
                          f"syncs/step {fmt_syncs(r['syncs_per_step'])}, peak {fmt_gb(r['peak_bytes'])}, "
                          f"final loss {r['final_loss']:.4g} [{r['wall_s']:.1f} s]", flush=True)
                if args.paper_loop == "all" and group:
                    ref = next((g for g in group if g["loss"] == "el_nivmf"), group[0])
                    ref["net_ms"] = ref["step_ms"] - ref["loss_ms"]
                    ref["anchor_after"] = True
                    if (dim, classes) not in anchors:
                        t0 = time.perf_counter()
                        with torch.no_grad(), amp():
                            emb = model(images_u8.float().div_(255.0)).detach()
                        anchors[(dim, classes)] = a = run_paper_loop(emb, labels, classes, dim, args, clock)
                        print(f"  paper loop p={dim} C={classes}: loss fwd+bwd {fmt_ms(a['loss_ms'])} ms on "
                              f"{a['images']}/{B} images{' (scaled)' if a['images'] < B else ''}, "
                              f"loss mem {fmt_gb(a['loss_peak_bytes'])} [{time.perf_counter() - t0:.1f} s]", flush=True)
                    a = anchors[(dim, classes)]
                    ref["anchor_loss_ms"] = a["loss_ms"]
                    ref["anchor_images"] = a["images"]
            del model, images_u8
            free_memory(device)
    wall = time.perf_counter() - t_start

    # ---- summary
    print()
    print(f"## train step throughput — {name}; torch {torch.__version__}; batch {B}, {R} px; "
          f"{'bf16' if amp_dtype else 'fp32'}; S = {args.samples}; {wall:.0f} s")
    print()
    for line in table(results, anchors, B):
        print(line)
    print()
    print("loss ms: loss forward + backward alone on the step's embeddings; share = loss ms / step ms; "
          "* paper loop: implied step = network ms (el_nivmf step − loss) + loop ms.")
    if anchors:
        print()
        print("| p | C | el_nivmf loss ms | paper loop ms | loop / el_nivmf |")
        print("|---|---|---|---|---|")
        for (dim, classes), a in anchors.items():
            ours = [r["loss_ms"] for r in results if r["loss"] == "el_nivmf" and r["embed_dim"] == dim
                    and r["num_classes"] == classes]
            ratio = f"{a['loss_ms'] / min(ours):.0f}×" if ours else "–"
            ours_s = fmt_ms(min(ours)) if ours else "–"
            scaled = "" if a["images"] == B else f" ({a['images']}/{B} imgs, scaled)"
            print(f"| {dim} | {classes} | {ours_s} | {fmt_ms(a['loss_ms'])}{scaled} | {ratio} |")
    bad = [r for r in results if not r["finite"]]
    if bad:
        print(f"\nWARNING: non-finite loss after the timed steps in {len(bad)} cell(s): "
              + ", ".join(f"{r['backbone']}/{r['embed_dim']}/{r['num_classes']}/{r['loss']}" for r in bad))

    # ---- the target
    print()
    hit = [r for r in results if r["backbone"] == TARGET["backbone"] and r["embed_dim"] == TARGET["embed_dim"]
           and r["num_classes"] == TARGET["num_classes"] and r["loss"] == TARGET["loss"]]
    card = name.split(",")[0]
    official = device.type == "cuda" and any(k in card for k in ("H100", "H200")) and amp_dtype is not None
    official = official and B == 112 and R == 224 and args.samples == 5
    where = f"on {card}" if official else (f"informational: the target is for an H100/H200, bf16, batch 112, 224 px, "
                                          f"S = 5; this run: {card}")
    if not hit:
        print("target check: not run (needs --backbones resnet50 --dims 512 --classes 11318 --losses el_nivmf; "
              f"{where})")
    else:
        r = hit[0]
        verdict = "PASS" if r["share"] <= TARGET["share"] and r["finite"] else "FAIL"
        extra = ""
        if r.get("anchor_loss_ms"):
            extra = f"; paper loop {fmt_ms(r['anchor_loss_ms'])} ms → {r['anchor_loss_ms'] / r['loss_ms']:.0f}× faster"
        print(f"target check: {verdict} — el_nivmf loss {fmt_ms(r['loss_ms'])} ms = {100 * r['share']:.1f}% of a "
              f"resnet50 {'bf16 ' if amp_dtype else ''}step of {fmt_ms(r['step_ms'])} ms (≤ 10% wanted) at C = 11318, "
              f"p = 512, S = {args.samples}, batch {B}, {R} px{extra} ({where})")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "device": name, "torch": torch.__version__, "batch_size": B, "resolution": R, "amp": str(amp_dtype),
            "samples": args.samples, "steps": args.steps, "warmup": args.warmup, "tf32": args.tf32,
            "results": results,
            "paper_loop": [{k: v for k, v in a.items()} for a in anchors.values()],
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
