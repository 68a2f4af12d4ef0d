r"""``OUTPUT/report.md``: a run's metric tables and plots (PNG, matplotlib's Agg renderer).

`write_report` writes the Markdown report and its figures in ``OUTPUT/report/``:

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dml.checkpoint import atomic_write_bytes, atomic_write_text

__all__ = ["write_report", "PLOT_NAMES"]

#: the figures `write_report` may write in ``OUTPUT/report/``
PLOT_NAMES = ("training_curves.png", "kappa_histogram.png", "rejection_curve.png", "kappa_vs_degradation.png",
              "degradation_examples.png", "confident_images.png")

_METRIC_COLUMNS = (("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"), ("recall@8", "R@8"),
                   ("map@r", "MAP@R"), ("r_precision", "R-precision"), ("nmi", "NMI"),
                   ("recall@1_euclidean", "R@1 (Euclidean)"), ("map@r_euclidean", "MAP@R (Euclidean)"))
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


def _plot_histogram(uncertainty: dict, details: Any, path: Path) -> None:
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
    auroc = uncertainty.get("auroc_kappa")
    ax.set(title=f"κ of the test queries  (AUROC of κ for 1-NN correct: {_fmt(auroc, 3)})", xlabel="κ = ‖e‖",
           ylabel="density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_rejection(uncertainty: dict, path: Path) -> None:
    curve = np.asarray(uncertainty["rejection_curve"], dtype=float)
    fractions, recall = curve[:, 0], curve[:, 1]
    base = uncertainty.get("recall@1", recall[0] if fractions[0] == 0 else math.nan)
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
    from dml.uncertainty import degrade

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


def _plot_confident(details: Any, test_split: Any, resolution: int, path: Path, per_row: int = 8) -> None:
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
            label = test_split.class_names[test_split.labels[i]]
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


def _metric_rows(final_metrics: dict, history: list[dict]) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = []
    if "recall@1" in final_metrics:
        epoch = final_metrics.get("selected_epoch")
        selection = final_metrics.get("selection", "selected")
        rows.append((f"selected checkpoint (epoch {epoch}; {selection})", final_metrics))
    if isinstance(final_metrics.get("last_epoch"), dict):
        last = history[-1].get("epoch") if history else None
        rows.append((f"last epoch ({last})" if last is not None else "last epoch", final_metrics["last_epoch"]))
    if isinstance(final_metrics.get("initial"), dict):
        rows.append(("before training", final_metrics["initial"]))
    evaluated = final_metrics.get("evaluate")
    if isinstance(evaluated, dict) and "recall@1" in evaluated:
        what = f"`{evaluated.get('checkpoint', '?')}.pt`"
        if evaluated.get("epoch") is not None:
            what += f", epoch {evaluated['epoch']}"
        rows.append((f"re-evaluated by `dml.evaluate` ({what})", evaluated))
    return rows


def write_report(
    out_dir: str | Path,
    *,
    history: list[dict],
    final_metrics: dict,
    uncertainty: dict | None,
    test_split: Any,
    per_query: Any = None,
    resolution: int,
    config: dict | None = None,
) -> Path:
    r"""Write ``out_dir/report.md`` with the run's metric tables and its figures in ``out_dir/report/``.

    Sections: the run (from ``config``), the test metrics (rows: the selected checkpoint, the last
    epoch, before training, and a `dml.evaluate` re-evaluation — whichever ``final_metrics`` holds),
    training curves (loss, validation R@1 and MAP@R with the selected epoch marked, mean training κ),
    and the uncertainty of κ = ‖e‖: AUROC, Spearman, κ statistics, the accuracy–rejection curve, the
    degradation test, and the most / least confident test images. Figures whose inputs are missing
    are skipped and the report says why (no validation split; ``uncertainty`` None for losses whose
    norm is no concentration; ``per_query`` None). Figures from an earlier report that this one does
    not draw are removed. All files are written atomically.

    Args:
        out_dir: the run directory.
        history: one record per epoch (``history.jsonl``): ``epoch``, ``train`` (``loss``, optionally
            ``mean_image_kappa`` …) and optionally ``val`` (``recall@1``, ``map@r`` …).
        final_metrics: what ``final_metrics.json`` holds: the selected checkpoint's test metrics at the
            top level, ``selected_epoch``, ``selection``, ``last_epoch``, ``initial``, optionally
            ``evaluate`` (any of them may be missing).
        uncertainty: the first return value of `dml.uncertainty.evaluate_uncertainty`, or None.
        test_split: the test `dml.data.Split` (image paths, labels, class names) for the image grids;
            None skips them.
        per_query: the second return value of `dml.uncertainty.evaluate_uncertainty` (an
            `dml.uncertainty.UncertaintyDetails`), or None (no histogram, no image grid).
        resolution: the evaluation crop size, for showing the images as the model saw them.
        config: the run's configuration (``config.json``) for the heading, or None.

    Returns:
        The path of ``report.md``.

    Raises:
        OSError: if the files cannot be written.
        dml.data.DatasetError: if a test image shown in a grid cannot be decoded.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "report"
    fig_dir.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401

        plotting = True
    except ImportError:
        plotting = False
    written: set[str] = set()

    def figure(name: str, draw, *args) -> str | None:
        if not plotting:
            return None
        draw(*args, fig_dir / name)
        written.add(name)
        return f"report/{name}"

    lines: list[str] = [f"# Run report: `{out_dir.name}`", ""]
    if config:
        keys = ("dataset", "backbone", "embed_dim", "loss", "trunk", "epochs", "batch_size", "lr", "seed")
        lines.append(" · ".join(f"{k} `{config[k]}`" for k in keys if k in config))
        if config.get("loss_options"):
            lines.append("")
            lines.append("loss options: " + ", ".join(f"`{k}={v}`" for k, v in sorted(config["loss_options"].items())))
        lines.append("")
    facts = []
    if final_metrics.get("device"):
        facts.append(f"device `{final_metrics['device']}`")
    if final_metrics.get("wall_time_s") is not None:
        facts.append(f"wall time {final_metrics['wall_time_s']} s")
    if test_split is not None:
        facts.append(f"test split: {len(test_split)} images of {test_split.num_classes} classes, "
                     f"evaluated at {resolution} px")
    if facts:
        lines += [", ".join(facts) + ".", ""]
    if not plotting:
        lines += ["*matplotlib is not installed: the figures are left out (`pip install matplotlib`).*", ""]

    # --- test metrics --------------------------------------------------------------------------------
    lines += ["## Test metrics", ""]
    rows = _metric_rows(final_metrics, history)
    if rows:
        columns = [(k, name) for k, name in _METRIC_COLUMNS if any(k in m for _, m in rows)]
        lines += _table(["", *(name for _, name in columns)],
                        [[label, *(_fmt(m.get(k)) for k, _ in columns)] for label, m in rows])
        lines += ["", "Leave-one-out retrieval over the test classes (never seen in training), cosine similarity "
                  "unless marked Euclidean; NMI of k-means clusters (`dml.evaluation`)."]
    else:
        lines.append("No test metrics recorded yet.")
    lines.append("")

    # --- training ------------------------------------------------------------------------------------
    lines += ["## Training", ""]
    if history:
        has_val = any("val" in r for r in history)
        selected = final_metrics.get("selected_epoch")
        src = figure("training_curves.png", _plot_training, history, selected)
        if src:
            lines += [f"![training curves]({src})", ""]
        if not has_val:
            lines += ["No validation split (`--val-fraction 0`): no validation curve, and the last epoch is the "
                      "selected one.", ""]
        val_key = "recall@1"
        header = ["epoch", "train loss"] + (["val R@1", "val MAP@R"] if has_val else [])
        has_kappa = any("mean_image_kappa" in r.get("train", {}) for r in history)
        header += ["mean image κ"] if has_kappa else []
        table_rows = []
        for r in history:
            row = [str(r.get("epoch", "")) + (" ★" if r.get("epoch") == selected and has_val else ""),
                   _fmt(r.get("train", {}).get("loss"))]
            if has_val:
                val = r.get("val", {})
                row += [_fmt(val.get(val_key)), _fmt(val.get("map@r"))]
            if has_kappa:
                row.append(_kappa_fmt(r.get("train", {}).get("mean_image_kappa")))
            table_rows.append(row)
        lines += ["<details><summary>per-epoch values</summary>", ""]
        lines += _table(header, table_rows)
        lines += ["", "</details>", ""]
    else:
        lines += ["No epoch recorded (`history.jsonl` is empty or missing).", ""]

    # --- uncertainty ---------------------------------------------------------------------------------
    lines += ["## Uncertainty: the embedding norm κ = ‖e‖", ""]
    if uncertainty is None:
        loss = f"`{config['loss']}`" if config and "loss" in config else "this run's loss"
        lines += [f"Not evaluated: {loss} does not model the embedding norm as a vMF concentration (only the "
                  "vMF-based losses `el_nivmf`, `el_nivmf_paper`, `el_vmf`, `ppk_vmf` and `kl_vmf` do), so κ is "
                  "no uncertainty here and the κ figures are left out.", ""]
    else:
        u = uncertainty
        lines += _table(["", "value"], [
            ["AUROC of κ for “1-NN correct”", _fmt(u.get("auroc_kappa"))],
            ["Spearman ρ(κ, AP@R)", _fmt(u.get("spearman_kappa_ap"))],
            ["mean κ ± std (all test images)",
             f"{_kappa_fmt(u.get('mean_kappa'))} ± {_kappa_fmt(u.get('std_kappa'))}"],
            ["mean κ, 1-NN correct / wrong", f"{_kappa_fmt(u.get('mean_kappa_correct'))} / "
                                             f"{_kappa_fmt(u.get('mean_kappa_wrong'))}"],
            ["queries (1-NN correct)", f"{u.get('num_queries', '–')} ({u.get('num_correct', '–')})"],
        ])
        lines += ["", "AUROC 0.5: κ says nothing about whether the nearest neighbour is right; 1: every correct query "
                  "is more confident than every wrong one (–: undefined, all queries correct or all wrong). "
                  "Queries: test images with at least one other image of their class.", ""]
        if per_query is not None:
            src = figure("kappa_histogram.png", _plot_histogram, u, per_query)
            if src:
                lines += [f"![kappa histogram]({src})", ""]
        else:
            lines += ["(No per-query values given: no κ histogram and no image grid.)", ""]

        curve = u.get("rejection_curve") or []
        if curve:
            lines += ["### Accuracy–rejection curve", ""]
            lines += _table(["queries rejected", *(f"{100 * f:.0f}%" for f, _ in curve)],
                            [["R@1 of the rest", *(_fmt(v, 3) for _, v in curve)]])
            lines.append("")
            src = figure("rejection_curve.png", _plot_rejection, u)
            if src:
                lines += [f"![accuracy-rejection curve]({src})", ""]
            lines += ["The least confident (lowest κ) queries are rejected first; a useful κ makes the curve rise "
                      "(random rejection keeps it flat; the oracle rejects the wrong queries first).", ""]

        degradation = u.get("degradation")
        lines += ["### Degradation test", ""]
        if degradation:
            levels = degradation["levels"]
            header = ["", *(f"s = {s:g}" for s in levels), "ρ(s, κ)", "mean per-image ρ"]
            drows = []
            for kind, r in degradation["kinds"].items():
                text = _PARAMETER_TEXT.get(r["parameter"], lambda v: f"{v:g}")
                cells = [f"{_kappa_fmt(m)} ({text(p)})" for m, p in zip(r["mean_kappa"], r["parameter_values"])]
                drows.append([_KIND_LABELS.get(kind, kind), *cells, _fmt(r["spearman"], 3),
                              _fmt(r["mean_image_spearman"], 3)])
            drows.append(["mean over kinds", *(_kappa_fmt(m) for m in degradation["mean_kappa"]),
                          _fmt(degradation["mean_spearman"], 3), _fmt(degradation["mean_image_spearman"], 3)])
            lines += _table(header, drows)
            lines += ["", f"Mean κ of {degradation['num_images']} test images (seed {degradation.get('seed', 0)}) at "
                      "every strength s. ρ(s, κ): Spearman over all (image, strength) pairs; per-image ρ: Spearman "
                      "across the strengths of one image, averaged. The paper's claim — degraded, ambiguous images "
                      "get a lower κ — predicts negative values.", ""]
            src = figure("kappa_vs_degradation.png", _plot_degradation, degradation)
            if src:
                lines += [f"![kappa vs degradation]({src})", ""]
            if test_split is not None and len(test_split):
                example = 0
                if per_query is not None and per_query.kappa.numel():
                    example = int(torch.argsort(per_query.kappa.double(), stable=True)[per_query.kappa.numel() // 2])
                src = figure("degradation_examples.png", _plot_examples, _eval_image(test_split.paths[example],
                                                                                     resolution), degradation)
                if src:
                    lines += [f"![degradation examples]({src})", ""]
        else:
            lines += ["Not run (no test images were used for it).", ""]

        if per_query is not None and test_split is not None and len(test_split) >= 2:
            lines += ["### Most and least confident test images", ""]
            src = figure("confident_images.png", _plot_confident, per_query, test_split, resolution)
            if src:
                lines += [f"![most and least confident test images]({src})", ""]

    lines += ["---", "", "References: M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, *A Non-isotropic Probabilistic Take "
              "on Proxy-based Deep Metric Learning*, ECCV 2022 (κ = ‖e‖ as certainty); M. S. A. Nadeem, "
              "J.-D. Zucker, B. Hanczar, *Accuracy-Rejection Curves (ARCs) for Comparing Classification Methods "
              "with a Reject Option*, MLSB 2009; K. Musgrave, S. Belongie, S.-N. Lim, *A Metric Learning Reality "
              "Check*, ECCV 2020 (MAP@R). Written by `dml.report`.", ""]

    for name in PLOT_NAMES:  # figures of an earlier report that this one does not draw
        if name not in written:
            (fig_dir / name).unlink(missing_ok=True)
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
