r"""``OUTPUT/report.md``: a run's metric tables and plots (PNG, matplotlib's Agg renderer).

`write_report` writes the Markdown report (one function per section) and its figures in ``OUTPUT/report/``:

| file | what |
|---|---|
| ``training_curves.png`` | training loss, validation R@1 (and MAP@R) and the mean training κ per epoch |
| ``kappa_histogram.png`` | κ of the test queries whose 1-NN is correct vs. wrong |
| ``rejection_curve.png`` | R@1 of the kept queries after rejecting the least confident (random, oracle) |
| ``kappa_vs_degradation.png`` | mean κ vs. the strength of blur, downsampling and occlusion |
| ``degradation_examples.png`` | one test image at every degradation strength |
| ``confident_images.png`` | the most and the least confident test images, with κ |

The κ figures exist only where there are uncertainty results (vMF-based losses; see
`dml.uncertainty.kappa_is_concentration`); the report says why they are missing otherwise. Figures are
drawn with matplotlib's object-oriented API (no pyplot, no global backend change); without matplotlib
the report holds the tables only and says so.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dml.checkpoint import atomic_write_bytes, atomic_write_text
from dml.data import Split
from dml.final_eval import RetrievalMetrics, UncertaintyResult
from dml.uncertainty import UncertaintyDetails

__all__ = ["PLOT_NAMES", "ReportInputs", "metric_rows", "write_report"]

#: the figures `write_report` may write in ``OUTPUT/report/``
PLOT_NAMES = ("training_curves.png", "kappa_histogram.png", "rejection_curve.png", "kappa_vs_degradation.png",
              "degradation_examples.png", "confident_images.png")

_METRIC_COLUMNS = (("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"), ("recall@8", "R@8"),
                   ("map@r", "MAP@R"), ("r_precision", "R-precision"), ("nmi", "NMI"),
                   ("recall@1_euclidean", "R@1 (Euclidean)"), ("map@r_euclidean", "MAP@R (Euclidean)"),
                   ("recall@1_cross_domain", "R@1 (cross-domain)"), ("map@r_cross_domain", "MAP@R (cross-domain)"))
_KIND_LABELS = {"blur": "blur", "downsample": "downsample", "occlude": "occlusion"}
_PARAMETER_TEXT = {"sigma_px": lambda v: f"σ {v:.1f} px", "factor": lambda v: f"÷{v:.2f}",
                   "area_fraction": lambda v: f"{100 * v:.0f}% area"}
_CORRECT, _WRONG = "#2a9d3f", "#d1495b"
_TICK = "\N{CHECK MARK}"
_CROSS = "\N{BALLOT X}"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def _kappa_fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# --------------------------------------------------------------------------------------------------
# figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def _plot_training(history: list[dict], selected_epoch: int | None, path: Path) -> None:
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(history)]
    loss = [r.get("train", {}).get("loss", math.nan) for r in history]
    has_val = any("val" in r for r in history)
    kappa = [r.get("train", {}).get("mean_image_kappa") for r in history]
    has_kappa = any(k is not None for k in kappa)
    panels = 1 + has_val + has_kappa
    fig = _figure(4.2 * panels, 3.4)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ax.plot(epochs, loss, marker="o", ms=3, color="#3b6ea8")
    ax.set(title="training loss (epoch mean)", xlabel="epoch", ylabel="loss")
    i = 1
    if has_val:
        ax = axes[i]
        i += 1
        val_epochs = [e for e, r in zip(epochs, history) if "val" in r]
        r1 = [r["val"].get("recall@1", math.nan) for r in history if "val" in r]
        ax.plot(val_epochs, r1, marker="o", ms=3, color="#3b6ea8", label="R@1")
        if any("map@r" in r["val"] for r in history if "val" in r):
            mapr = [r["val"].get("map@r", math.nan) for r in history if "val" in r]
            ax.plot(val_epochs, mapr, marker="s", ms=3, ls="--", color="#888888", label="MAP@R")
        if selected_epoch in val_epochs:
            ax.axvline(selected_epoch, color=_CORRECT, lw=1, ls=":")
            ax.plot([selected_epoch], [r1[val_epochs.index(selected_epoch)]], marker="*", ms=12, color=_CORRECT,
                    ls="none", label=f"selected (epoch {selected_epoch})")
        ax.set(title="validation retrieval", xlabel="epoch", ylabel="score")
        ax.legend(fontsize=8)
    if has_kappa:
        ax = axes[i]
        ax.plot([e for e, k in zip(epochs, kappa) if k is not None], [k for k in kappa if k is not None],
                marker="o", ms=3, color="#7b4fa0")
        ax.set(title="mean image κ (last training batch)", xlabel="epoch", ylabel="κ = ‖e‖")
    for ax in axes:
        ax.grid(alpha=0.3)
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
    _save(fig, path)


def _plot_histogram(auroc: float | None, details: UncertaintyDetails, path: Path) -> None:
    kappa = details.kappa[details.query_index].double().numpy()
    correct = details.correct.numpy().astype(bool)
    fig = _figure(6.4, 3.8)
    ax = fig.subplots()
    lo, hi = float(kappa.min()), float(kappa.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
    for mask, colour, name in ((correct, _CORRECT, "1-NN correct"), (~correct, _WRONG, "1-NN wrong")):
        if mask.any():
            ax.hist(kappa[mask], bins=bins, density=True, alpha=0.45, color=colour,
                    label=f"{name} ({int(mask.sum())} queries, mean κ {_kappa_fmt(float(kappa[mask].mean()))})")
            ax.hist(kappa[mask], bins=bins, density=True, histtype="step", color=colour, lw=1.4)
    ax.set(title=f"κ of the test queries  (AUROC of κ for 1-NN correct: {_fmt(auroc, 3)})", xlabel="κ = ‖e‖",
           ylabel="density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_rejection(base: float, rejection_curve: list[list[float]], path: Path) -> None:
    curve = np.asarray(rejection_curve, dtype=float)
    fractions, recall = curve[:, 0], curve[:, 1]
    fig = _figure(5.6, 3.8)
    ax = fig.subplots()
    grid = np.linspace(0, max(0.95, float(fractions.max())), 100)
    ax.plot(100 * grid, np.minimum(1.0, base / (1 - grid)), ls=":", color="#888888",
            label="oracle (reject wrong queries first)")
    ax.axhline(base, ls="--", color="#888888", lw=1, label=f"random rejection (R@1 {base:.3f})")
    ax.plot(100 * fractions, recall, marker="o", color="#3b6ea8", label="reject lowest κ first")
    ax.set(title="accuracy–rejection curve (test queries)", xlabel="queries rejected (%)",
           ylabel="R@1 of the kept queries", ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_degradation(degradation: dict, path: Path) -> None:
    levels = np.asarray(degradation["levels"], dtype=float)
    n = max(1, int(degradation.get("num_images", 1)))
    kinds = list(degradation["kinds"].items())
    colours = {"blur": "#3b6ea8", "downsample": "#e07b39", "occlude": "#7b4fa0"}
    fig = _figure(3.6 * max(1, len(kinds)) + 0.3, 3.7)
    axes = fig.subplots(1, max(1, len(kinds)), squeeze=False)[0]
    for ax, (kind, result) in zip(axes, kinds):  # one panel per kind: each on its own scale
        mean = np.asarray(result["mean_kappa"], dtype=float)
        sem = np.asarray(result["std_kappa"], dtype=float) / math.sqrt(n)
        text = _PARAMETER_TEXT.get(result["parameter"], lambda v: f"{v:g}")
        ax.errorbar(levels, mean, yerr=sem, marker="o", capsize=3, color=colours.get(kind, "#3b6ea8"))
        if 0.0 in levels:
            ax.axhline(mean[list(levels).index(0.0)], ls="--", lw=1, color="#888888", label="clean images")
            ax.legend(fontsize=8)
        ax.set_xticks(levels)
        ax.set_xticklabels([f"{s:g}\n{text(v)}" for s, v in zip(levels, result["parameter_values"])], fontsize=7.5)
        ax.set_title(f"{_KIND_LABELS.get(kind, kind)}: ρ = {_fmt(result['spearman'], 2)} "
                     f"(per image {_fmt(result['mean_image_spearman'], 2)})", fontsize=10)
        ax.set_xlabel("strength s")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean κ = ‖e‖ (± s.e.m.)")
    fig.suptitle(f"κ of {n} test images vs. degradation strength (ρ: Spearman of strength and κ)", fontsize=10)
    _save(fig, path)


def _eval_image(path: str, resolution: int) -> torch.Tensor:
    from dml.data import EvalTransform, decode_image, eval_resize

    return EvalTransform(resolution)(decode_image(path, max_side=eval_resize(resolution)))


def _show(ax, image: torch.Tensor) -> None:
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest" if image.shape[-1] < 96 else None)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_examples(image: torch.Tensor, degradation: dict, path: Path) -> None:
    from dml.data.degradations import degrade

    levels = degradation["levels"]
    kinds = list(degradation["kinds"])
    fig = _figure(1.7 * len(levels) + 0.6, 1.85 * len(kinds) + 0.4)
    axes = fig.subplots(len(kinds), len(levels), squeeze=False)
    for r, kind in enumerate(kinds):
        result = degradation["kinds"][kind]
        text = _PARAMETER_TEXT.get(result["parameter"], lambda v: f"{v:g}")
        for c, s in enumerate(levels):
            ax = axes[r][c]
            out = degrade(kind, image[None], s, torch.Generator().manual_seed(int(degradation.get("seed", 0))))[0]
            _show(ax, out)
            ax.set_title(f"s = {s:g}: {text(result['parameter_values'][c])}", fontsize=8)
            if c == 0:
                ax.set_ylabel(_KIND_LABELS.get(kind, kind), fontsize=9)
    fig.suptitle("the degradations at every strength (one test image)", fontsize=10)
    _save(fig, path)


def _renderable(text: str) -> str:
    """``text`` without the characters that matplotlib's font cannot draw (emoji in class names would
    otherwise warn "Glyph … missing" and show as boxes)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font = FT2Font(font_manager.findfont(font_manager.FontProperties()))
    kept = "".join(c for c in text if c.isspace() or font.get_char_index(ord(c)))
    return " ".join(kept.split())


def _plot_confident(details: UncertaintyDetails, test_split: Split, resolution: int, path: Path,
                    per_row: int = 8) -> None:
    kappa = details.kappa.double()
    n = kappa.numel()
    k = min(per_row, max(1, n // 2))
    order = torch.sort(kappa, descending=True, stable=True).indices
    rows = [("most confident", order[:k].tolist()), ("least confident", order.flip(0)[:k].tolist())]
    correct = {int(q): bool(c) for q, c in zip(details.query_index.tolist(), details.correct.tolist())}
    fig = _figure(1.55 * k + 0.5, 2 * 2.05 + 0.4)
    axes = fig.subplots(2, k, squeeze=False)
    for r, (name, indices) in enumerate(rows):
        for c, i in enumerate(indices):
            ax = axes[r][c]
            _show(ax, _eval_image(test_split.paths[i], resolution))
            label = _renderable(test_split.class_names[test_split.labels[i]])
            label = label if len(label) <= 16 else label[:15] + "…"
            mark = ""
            if i in correct:
                mark = f"  1-NN {_TICK}" if correct[i] else f"  1-NN {_CROSS}"
                for spine in ax.spines.values():
                    spine.set_edgecolor(_CORRECT if correct[i] else _WRONG)
                    spine.set_linewidth(2.5)
            ax.set_title(f"κ {_kappa_fmt(float(kappa[i]))}{mark}\n{label}", fontsize=7.5)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("test images by κ (border: green = nearest neighbour has the class, red = it has not)", fontsize=9)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------
# the report


def metric_rows(final_metrics: dict[str, Any], history: list[dict[str, Any]]) -> list[tuple[str, RetrievalMetrics]]:
    """The rows of the report's test-metric table from a ``final_metrics.json`` dict.

    Args:
        final_metrics: the dict (any part may be missing).
        history: the epoch records, for the number of the last epoch.

    Returns:
        ``(label, metrics)`` for the selected checkpoint, the last epoch, before training and a
        ``dml.evaluate`` re-evaluation, whichever are present.
    """
    rows: list[tuple[str, RetrievalMetrics]] = []
    if "recall@1" in final_metrics:
        selection = final_metrics.get("selection", "selected")
        rows.append((f"selected checkpoint (epoch {final_metrics.get('selected_epoch')}; {selection})",
                     RetrievalMetrics.from_dict(final_metrics)))
    if isinstance(final_metrics.get("last_epoch"), dict):
        last = history[-1].get("epoch") if history else None
        label = f"last epoch ({last})" if last is not None else "last epoch"
        rows.append((label, RetrievalMetrics.from_dict(final_metrics["last_epoch"])))
    if isinstance(final_metrics.get("initial"), dict):
        rows.append(("before training", RetrievalMetrics.from_dict(final_metrics["initial"])))
    evaluated = final_metrics.get("evaluate")
    if isinstance(evaluated, dict) and "recall@1" in evaluated:
        what = f"`{evaluated.get('checkpoint', '?')}.pt`"
        if evaluated.get("epoch") is not None:
            what += f", epoch {evaluated['epoch']}"
        rows.append((f"re-evaluated by `dml.evaluate` ({what})", RetrievalMetrics.from_dict(evaluated)))
    return rows


@dataclass
class ReportInputs:
    """Everything `write_report` shows.

    Attributes:
        rows: the test-metric table (`metric_rows`).
        history: one record per epoch (``history.jsonl``): ``epoch``, ``train`` (``loss``, optionally
            ``mean_image_kappa`` …) and optionally ``val`` (``recall@1``, ``map@r`` …).
        selected_epoch: the epoch of the selected checkpoint (marked in the curves), or None.
        uncertainty: the uncertainty metrics, or None (the report says why they are missing).
        details: the per-image values behind them (histogram, image grids), or None.
        test_split: the test split (image paths, class names) for the image grids, or None.
        resolution: the evaluation crop size, to show the images as the model saw them.
        config: the run's configuration (``config.json``) for the heading, or None.
        device: the run's device, or None.
        wall_time_s: the run's wall time, or None.
    """

    rows: list[tuple[str, RetrievalMetrics]]
    history: list[dict[str, Any]]
    selected_epoch: int | None
    uncertainty: UncertaintyResult | None
    details: UncertaintyDetails | None
    test_split: Split | None
    resolution: int
    config: dict[str, Any] | None = None
    device: str | None = None
    wall_time_s: float | None = None


class _Figures:
    """Draws the report's figures into ``report/`` (nothing without matplotlib) and remembers which."""

    def __init__(self, fig_dir: Path) -> None:
        self.fig_dir = fig_dir
        try:
            import matplotlib  # noqa: F401

            self.enabled = True
        except ImportError:
            self.enabled = False
        self.written: set[str] = set()

    def __call__(self, name: str, draw: Callable[..., None], *args: Any) -> list[str]:
        """Draw figure ``name``; the Markdown lines that show it ([] when it is not drawn)."""
        if not self.enabled:
            return []
        draw(*args, self.fig_dir / name)
        self.written.add(name)
        return [f"![{name.removesuffix('.png').replace('_', ' ')}](report/{name})", ""]

    def remove_stale(self) -> None:
        """Delete the figures of an earlier report that this one did not draw."""
        for name in PLOT_NAMES:
            if name not in self.written:
                (self.fig_dir / name).unlink(missing_ok=True)


def _heading_section(name: str, inputs: ReportInputs, plotting: bool) -> list[str]:
    lines = [f"# Run report: `{name}`", ""]
    config = inputs.config
    if config:
        keys = ("dataset", "backbone", "embed_dim", "loss", "trunk", "epochs", "batch_size", "lr", "seed")
        lines.append(" · ".join(f"{k} `{config[k]}`" for k in keys if k in config))
        if config.get("loss_options"):
            lines += ["", "loss options: " + ", ".join(f"`{k}={v}`" for k, v in sorted(config["loss_options"].items()))]
        lines.append("")
    facts = []
    if inputs.device:
        facts.append(f"device `{inputs.device}`")
    if inputs.wall_time_s is not None:
        facts.append(f"wall time {inputs.wall_time_s} s")
    if inputs.test_split is not None:
        facts.append(f"test split: {len(inputs.test_split)} images of {inputs.test_split.num_classes} classes, "
                     f"evaluated at {inputs.resolution} px")
    if facts:
        lines += [", ".join(facts) + ".", ""]
    if not plotting:
        lines += ["*matplotlib is not installed: the figures are left out (`pip install matplotlib`).*", ""]
    return lines


def _metrics_section(inputs: ReportInputs) -> list[str]:
    lines = ["## Test metrics", ""]
    if not inputs.rows:
        return lines + ["No test metrics recorded yet.", ""]
    table = [(label, m.to_json()) for label, m in inputs.rows]
    columns = [(k, name) for k, name in _METRIC_COLUMNS if any(k in m for _, m in table)]
    lines += _table(["", *(name for _, name in columns)],
                    [[label, *(_fmt(m.get(k)) for k, _ in columns)] for label, m in table])
    return lines + ["", "Leave-one-out retrieval over the test classes (never seen in training), cosine similarity "
                    "unless marked Euclidean; cross-domain: a query searches only the images of the other domains "
                    "(on emoji: the other artists' pictures); NMI of k-means clusters (`dml.metrics`).", ""]


def _training_section(inputs: ReportInputs, figure: _Figures) -> list[str]:
    lines = ["## Training", ""]
    history, selected = inputs.history, inputs.selected_epoch
    if not history:
        return lines + ["No epoch recorded (`history.jsonl` is empty or missing).", ""]
    has_val = any("val" in r for r in history)
    lines += figure("training_curves.png", _plot_training, history, selected)
    if not has_val:
        lines += ["No validation split (`--val-fraction 0`): no validation curve, and the last epoch is the "
                  "selected one.", ""]
    header = ["epoch", "train loss"] + (["val R@1", "val MAP@R"] if has_val else [])
    has_kappa = any("mean_image_kappa" in r.get("train", {}) for r in history)
    header += ["mean image κ"] if has_kappa else []
    rows = []
    for r in history:
        row = [str(r.get("epoch", "")) + (" ★" if r.get("epoch") == selected and has_val else ""),
               _fmt(r.get("train", {}).get("loss"))]
        if has_val:
            val = r.get("val", {})
            row += [_fmt(val.get("recall@1")), _fmt(val.get("map@r"))]
        if has_kappa:
            row.append(_kappa_fmt(r.get("train", {}).get("mean_image_kappa")))
        rows.append(row)
    return lines + ["<details><summary>per-epoch values</summary>", "", *_table(header, rows), "", "</details>", ""]


def _kappa_section(u: UncertaintyResult, inputs: ReportInputs, figure: _Figures) -> list[str]:
    lines = _table(["", "value"], [
        ["AUROC of κ for “1-NN correct”", _fmt(u.auroc_kappa)],
        ["Spearman ρ(κ, AP@R)", _fmt(u.spearman_kappa_ap)],
        ["mean κ ± std (all test images)", f"{_kappa_fmt(u.mean_kappa)} ± {_kappa_fmt(u.std_kappa)}"],
        ["mean κ, 1-NN correct / wrong", f"{_kappa_fmt(u.mean_kappa_correct)} / {_kappa_fmt(u.mean_kappa_wrong)}"],
        ["queries (1-NN correct)", f"{u.num_queries} ({u.num_correct})"],
    ])
    lines += ["", "AUROC 0.5: κ says nothing about whether the nearest neighbour is right; 1: every correct query "
              "is more confident than every wrong one (–: undefined, all queries correct or all wrong). "
              "Queries: test images with at least one other image of their class.", ""]
    if inputs.details is None:
        return lines + ["(No per-query values given: no κ histogram and no image grid.)", ""]
    return lines + figure("kappa_histogram.png", _plot_histogram, u.auroc_kappa, inputs.details)


def _rejection_section(u: UncertaintyResult, figure: _Figures) -> list[str]:
    curve = u.rejection_curve
    if not curve:
        return []
    lines = ["### Accuracy–rejection curve", ""]
    lines += _table(["queries rejected", *(f"{100 * f:.0f}%" for f, _ in curve)],
                    [["R@1 of the rest", *(_fmt(v, 3) for _, v in curve)]])
    lines.append("")
    lines += figure("rejection_curve.png", _plot_rejection, u.recall_at_1, curve)
    return lines + ["The least confident (lowest κ) queries are rejected first; a useful κ makes the curve rise "
                    "(random rejection keeps it flat; the oracle rejects the wrong queries first).", ""]


def _degradation_section(u: UncertaintyResult, inputs: ReportInputs, figure: _Figures) -> list[str]:
    lines = ["### Degradation test", ""]
    degradation = u.degradation
    if not degradation:
        return lines + ["Not run (`--degradation-images 0`).", ""]
    levels = degradation["levels"]
    header = ["", *(f"s = {s:g}" for s in levels), "ρ(s, κ)", "mean per-image ρ"]
    rows = []
    for kind, r in degradation["kinds"].items():
        text = _PARAMETER_TEXT.get(r["parameter"], lambda v: f"{v:g}")
        cells = [f"{_kappa_fmt(m)} ({text(p)})" for m, p in zip(r["mean_kappa"], r["parameter_values"])]
        rows.append([_KIND_LABELS.get(kind, kind), *cells, _fmt(r["spearman"], 3), _fmt(r["mean_image_spearman"], 3)])
    rows.append(["mean over kinds", *(_kappa_fmt(m) for m in degradation["mean_kappa"]),
                 _fmt(degradation["mean_spearman"], 3), _fmt(degradation["mean_image_spearman"], 3)])
    lines += _table(header, rows)
    lines += ["", f"Mean κ of {degradation['num_images']} test images (seed {degradation.get('seed', 0)}) at "
              "every strength s. ρ(s, κ): Spearman over all (image, strength) pairs; per-image ρ: Spearman "
              "across the strengths of one image, averaged. The paper's claim — degraded, ambiguous images "
              "get a lower κ — predicts negative values.", ""]
    lines += figure("kappa_vs_degradation.png", _plot_degradation, degradation)
    split = inputs.test_split
    if split is not None and len(split):
        example = 0
        details = inputs.details
        if details is not None and details.kappa.numel():
            example = int(torch.argsort(details.kappa.double(), stable=True)[details.kappa.numel() // 2])
        lines += figure("degradation_examples.png", _plot_examples, _eval_image(split.paths[example],
                                                                                inputs.resolution), degradation)
    return lines


def _confident_section(inputs: ReportInputs, figure: _Figures) -> list[str]:
    if inputs.details is None or inputs.test_split is None or len(inputs.test_split) < 2:
        return []
    return ["### Most and least confident test images", "",
            *figure("confident_images.png", _plot_confident, inputs.details, inputs.test_split, inputs.resolution)]


def _uncertainty_section(inputs: ReportInputs, figure: _Figures) -> list[str]:
    lines = ["## Uncertainty: the embedding norm κ = ‖e‖", ""]
    u = inputs.uncertainty
    if u is None:
        loss = f"`{inputs.config['loss']}`" if inputs.config and "loss" in inputs.config else "this run's loss"
        return lines + [f"Not evaluated: {loss} does not model the embedding norm as a vMF concentration (only the "
                        "vMF-based losses `el_nivmf`, `el_nivmf_paper`, `el_vmf`, `ppk_vmf` and `kl_vmf` do), so κ "
                        "is no uncertainty here and the κ figures are left out.", ""]
    return (lines + _kappa_section(u, inputs, figure) + _rejection_section(u, figure)
            + _degradation_section(u, inputs, figure) + _confident_section(inputs, figure))


def _references_section() -> list[str]:
    return ["---", "", "References: M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, *A Non-isotropic Probabilistic Take "
            "on Proxy-based Deep Metric Learning*, ECCV 2022 (κ = ‖e‖ as certainty); M. S. A. Nadeem, "
            "J.-D. Zucker, B. Hanczar, *Accuracy-Rejection Curves (ARCs) for Comparing Classification Methods "
            "with a Reject Option*, MLSB 2009; K. Musgrave, S. Belongie, S.-N. Lim, *A Metric Learning Reality "
            "Check*, ECCV 2020 (MAP@R). Written by `dml.report`.", ""]


def write_report(out_dir: str | Path, inputs: ReportInputs) -> Path:
    r"""Write ``out_dir/report.md`` with the run's metric tables and its figures in ``out_dir/report/``.

    One function per section: the run (configuration, device, test split), the test metrics (one row
    per entry of ``inputs.rows``), training curves (loss, validation R@1 and MAP@R with the selected
    epoch marked, mean training κ), and the uncertainty of κ = ‖e‖ (AUROC, Spearman, κ statistics, the
    accuracy–rejection curve, the degradation test, the most / least confident test images). Figures
    whose inputs are missing are skipped and the report says why. Figures from an earlier report that
    this one does not draw are removed. All files are written atomically.

    Args:
        out_dir: the run directory.
        inputs: what to show.

    Returns:
        The path of ``report.md``.

    Raises:
        OSError: if the files cannot be written.
        dml.data.DatasetError: if a test image shown in a grid cannot be decoded.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "report"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figure = _Figures(fig_dir)
    lines = (_heading_section(out_dir.name, inputs, figure.enabled) + _metrics_section(inputs)
             + _training_section(inputs, figure) + _uncertainty_section(inputs, figure) + _references_section())
    figure.remove_stale()
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
