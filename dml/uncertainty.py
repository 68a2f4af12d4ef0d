r"""Is the embedding norm an uncertainty? Retrieval-based and degradation-based tests of κ = ‖e‖.

For the vMF-based losses an image's embedding $e$ is a von Mises–Fisher distribution with mean
direction $\mu = e/\|e\|$ and concentration $\kappa = \|e\|$ (Kirchhof et al., ECCV 2022): a large κ
says "I am sure where this image lies on the sphere", a small one "this image is ambiguous". Two
families of tests check whether κ behaves like that on held-out classes:

* **Retrieval** (`uncertainty_metrics`): every test image with at least one other image of its class
  is a query; its nearest neighbour by cosine similarity among all other test images (leave-one-out,
  as in `dml.metrics`) is *correct* if it has the query's class. A useful κ is larger for the
  correct queries (AUROC of κ for correctness), grows with the query's average precision (Spearman
  correlation), and rejecting the least confident queries raises the Recall@1 of the rest (the
  accuracy–rejection curve).
* **Degradation** (`degradation_test`): blurring, downsampling and occluding test images remove
  information, so κ should fall as the degradation strength grows (negative Spearman correlation
  between strength and κ).

`evaluate_uncertainty` runs both for a trained model; `dml.report` turns the results into plots.

Everything is computed with torch on the embeddings' / images' device; the retrieval part needs a
few host synchronisations to size the computation (as `dml.metrics`) and one at the end.

References:
    * M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based
      Deep Metric Learning", ECCV 2022 (κ = ‖e‖ as the image's certainty; the degradation experiment).
    * K. Musgrave, S. Belongie, S.-N. Lim, "A Metric Learning Reality Check", ECCV 2020 (MAP@R).
    * M. S. A. Nadeem, J.-D. Zucker, B. Hanczar, "Accuracy-Rejection Curves (ARCs) for Comparing
      Classification Methods with a Reject Option", MLSB 2009 (accuracy–rejection curves).
    * J. A. Hanley, B. J. McNeil, "The meaning and use of the area under a receiver operating
      characteristic (ROC) curve", Radiology 143 (1982) (AUROC as the Mann–Whitney statistic).
    * C. Spearman, "The proof and measurement of association between two things", Am. J. Psychol. 15
      (1904).
    * S. J. Oh, K. Murphy, J. Pan, J. Roth, F. Schroff, A. Gallagher, "Modeling Uncertainty with
      Hedged Instance Embedding", ICLR 2019 (embedding uncertainty vs. image corruption).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from dml.data.degradations import DEGRADATIONS, degradation_parameter, degrade
from dml.data.degradations import check_images as _check_images
from dml.data.degradations import check_strength as _check_strength
from dml.metrics import accumulator_dtype, average_precision_at_r, ranked_chunks, retrieval_queries

__all__ = [
    "DEFAULT_REJECTION_FRACTIONS",
    "DEFAULT_LEVELS",
    "UncertaintyDetails",
    "average_ranks",
    "auroc",
    "spearman",
    "kappa_is_concentration",
    "per_query_uncertainty",
    "uncertainty_metrics",
    "degradation_test",
    "evaluate_uncertainty",
]

#: fractions of the least confident queries dropped by the accuracy–rejection curve
DEFAULT_REJECTION_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: degradation strengths of `degradation_test`
DEFAULT_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# --------------------------------------------------------------------------------------------------
# ranks, AUROC, Spearman


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    r"""1-based ranks of the entries of a 1-D tensor, tied entries sharing the mean of their ranks.

    A group of $t$ equal values occupying sorted positions $s+1, \dots, s+t$ gets the rank
    $s + (t + 1)/2$ each (``scipy.stats.rankdata(method="average")``). Computed with one sort on
    ``x``'s device, no host synchronisation.

    Args:
        x: ``[N]`` real tensor.

    Returns:
        ``[N]`` float64 ranks (float32 on MPS) on ``x``'s device.

    Raises:
        ValueError: if ``x`` is not 1-D.
    """
    if x.dim() != 1:
        raise ValueError(f"average_ranks expects a 1-D tensor, got shape {tuple(x.shape)}")
    acc = accumulator_dtype(x.device)
    if x.numel() == 0:
        return torch.zeros(0, dtype=acc, device=x.device)
    sorted_x, order = torch.sort(x, stable=True)
    _, group, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(acc)  # 1-based rank of the last member of every group
    group_rank = ends - (counts.to(acc) - 1) / 2
    ranks = torch.empty(x.shape[0], dtype=acc, device=x.device)
    ranks[order] = group_rank[group]
    return ranks


def _auroc_tensor(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AUROC as a 0-dim tensor (NaN when one class is empty); no host synchronisation."""
    acc = accumulator_dtype(scores.device)
    ranks = average_ranks(scores)
    pos = positive.to(acc)
    n_pos = pos.sum()
    n_neg = pos.numel() - n_pos
    u = (ranks * pos).sum() - n_pos * (n_pos + 1) / 2  # Mann–Whitney U of the positives
    denominator = n_pos * n_neg
    return torch.where(denominator > 0, u / denominator.clamp_min(1), torch.full_like(u, math.nan))


def _spearman_tensor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's ρ as a 0-dim tensor (NaN when a side is constant or N < 2); no host synchronisation."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.square().sum() * rb.square().sum()).sqrt()
    rho = (ra * rb).sum() / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    # constant input: all centred ranks are exactly 0 (ties get identical average ranks)
    return torch.where(denominator > 0, rho.clamp(-1, 1), torch.full_like(rho, math.nan))


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    for t, name in zip((a, b), names):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D torch.Tensor")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same length, got {a.shape[0]} and {b.shape[0]}")


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    r"""Area under the ROC curve of ``scores`` for predicting ``positive``, exact and rank-based.

    With $P$ positives, $M$ negatives and $r_i$ the average rank (`average_ranks`) of score $i$ among
    all $P + M$ scores,

    $$
    \mathrm{AUROC} = \frac{\sum_{i \in \text{pos}} r_i - P(P+1)/2}{P M}
    = \Pr[s_+ > s_-] + \tfrac12 \Pr[s_+ = s_-],
    $$

    the Mann–Whitney statistic: the probability that a random positive scores higher than a random
    negative, ties counting one half. It equals ``sklearn.metrics.roc_auc_score(positive, scores)``.

    Args:
        scores: ``[N]`` real scores (higher: more likely positive).
        positive: ``[N]`` booleans (or 0/1).

    Returns:
        AUROC in $[0, 1]$, or None when all items are positive or all negative (undefined; never NaN).

    Raises:
        ValueError: if the inputs are not 1-D tensors of the same length.

    References:
        J. A. Hanley, B. J. McNeil, "The meaning and use of the area under a receiver operating
        characteristic (ROC) curve", Radiology 143 (1982).
    """
    _check_pair(scores, positive, ("scores", "positive"))
    return _none_if_nan(float(_auroc_tensor(scores.detach(), positive.detach().bool())))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    r"""Spearman's rank correlation: the Pearson correlation of the average ranks.

    $$
    \rho = \frac{\sum_i (r^a_i - \bar r^a)(r^b_i - \bar r^b)}
    {\sqrt{\sum_i (r^a_i - \bar r^a)^2 \sum_i (r^b_i - \bar r^b)^2}},
    $$

    with tied values sharing their average rank (`average_ranks`), as ``scipy.stats.spearmanr``.

    Args:
        a: ``[N]`` real values.
        b: ``[N]`` real values.

    Returns:
        $\rho \in [-1, 1]$, or None when either side is constant or $N < 2$ (undefined; never NaN).

    Raises:
        ValueError: if the inputs are not 1-D tensors of the same length.

    References:
        C. Spearman, "The proof and measurement of association between two things", Am. J. Psychol.
        15 (1904).
    """
    _check_pair(a, b, ("a", "b"))
    if a.shape[0] < 2:
        return None
    return _none_if_nan(float(_spearman_tensor(a.detach(), b.detach().to(a.device))))


# --------------------------------------------------------------------------------------------------
# retrieval-based uncertainty


def kappa_is_concentration(loss_name: str) -> bool:
    """Whether the loss ``loss_name`` treats the embedding norm as a vMF concentration.

    True for the vMF-based losses (``el_nivmf``, ``el_nivmf_paper``, ``el_vmf``, ``ppk_vmf``,
    ``kl_vmf``: those with a positive `dml.losses.ProxyLoss.initial_norm_per_dim`), False for the
    others (ProxyAnchor, ProxyNCA++, NormSoftmax, the point baselines), whose norm is not an
    uncertainty; the trainer runs `evaluate_uncertainty` only for the former.

    Args:
        loss_name: a name of `dml.losses.LOSSES`.

    Returns:
        True if κ = ‖e‖ is the image's concentration under this loss.

    Raises:
        ValueError: for an unknown loss name.
    """
    from dml.losses import LOSSES

    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[loss_name].initial_norm_per_dim > 0


@dataclass
class UncertaintyDetails:
    """Per-image and per-query values behind the uncertainty metrics (for plots; not JSON).

    All tensors are on the CPU.

    Attributes:
        kappa: ``[N]`` float32, κ = ‖e‖ of every test image (in the order of the test split).
        labels: ``[N]`` int64 class labels.
        query_index: ``[Q]`` int64, the test images that are queries (those with ≥ 1 other image of
            their class), in increasing order.
        correct: ``[Q]`` bool, whether the query's cosine nearest neighbour has its class.
        nearest: ``[Q]`` int64, the index of that nearest neighbour.
        average_precision: ``[Q]`` float64, the query's AP@R (its MAP@R summand).
        degradation_kappa: ``{kind: [L, M] float32}`` κ of the M degradation-test images at every
            level (filled by `evaluate_uncertainty`; empty otherwise).
        degradation_index: ``[M]`` int64, the test images used by the degradation test (sorted).
    """

    kappa: torch.Tensor
    labels: torch.Tensor
    query_index: torch.Tensor
    correct: torch.Tensor
    nearest: torch.Tensor
    average_precision: torch.Tensor
    degradation_kappa: dict[str, torch.Tensor] = field(default_factory=dict)
    degradation_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


def _check_embeddings_labels(embeddings: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError("embeddings must be a 2-D floating-point torch.Tensor [N, D]")
    n = embeddings.shape[0]
    if n < 2 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must have N >= 2 rows and D >= 1 columns, got shape {tuple(embeddings.shape)}")
    x = embeddings.detach()
    x = x if x.dtype == torch.float64 else x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("embeddings must be finite (no NaN or inf)")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype not in _INTEGER_DTYPES:
        raise ValueError("labels must be a 1-D integer torch.Tensor [N]")
    if labels.shape[0] != n:
        raise ValueError(f"labels must have length N = {n} (the number of embeddings), got {labels.shape[0]}")
    return x, labels.detach().to(device=x.device, dtype=torch.int64)


def _check_fractions(fractions: object) -> tuple[float, ...]:
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or len(fractions) == 0:
        raise ValueError(f"rejection_fractions must be a non-empty sequence of numbers in [0, 1), got {fractions!r}")
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float, np.floating, np.integer)) or not 0 <= f < 1:
            raise ValueError(f"every rejection fraction must be a number in [0, 1), got {f!r}")
        out.append(float(f))
    return tuple(out)


def _per_query_tensors(x: torch.Tensor, y: torch.Tensor, chunk_size: int) -> dict[str, torch.Tensor]:
    """κ of all items; query indices, 1-NN correctness, 1-NN index and AP@R per query (on the device).

    The leave-one-out cosine retrieval of `dml.metrics` (same queries, ranking and AP@R), kept per query.
    """
    acc = accumulator_dtype(x.device)
    r_all, queries = retrieval_queries(y)
    top = min(int(r_all.max()), x.shape[0] - 1)  # host sync (sizes topk); ≥ 1
    unit = F.normalize(x, dim=1)
    correct, nearest_all, ap = [], [], []
    for q, nearest, rel in ranked_chunks(lambda q: unit[q] @ unit.T, y, queries, top, chunk_size):
        ap.append(average_precision_at_r(rel, r_all[q], acc))
        correct.append(rel[:, 0])
        nearest_all.append(nearest[:, 0])
    return {
        "kappa": x.norm(dim=1).to(torch.float32),
        "query_index": queries,
        "correct": torch.cat(correct),
        "nearest": torch.cat(nearest_all),
        "average_precision": torch.cat(ap),
    }


def per_query_uncertainty(
    embeddings: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024
) -> UncertaintyDetails:
    r"""κ of every item and, per query, its 1-NN correctness and average precision at R (on the CPU).

    Queries are the items with $R \ge 1$ other items of their class; each is ranked against the other
    $N - 1$ items by cosine similarity, in chunks of ``chunk_size`` queries (as `dml.metrics`). The
    query's AP@R is $\frac{1}{R}\sum_{i=1}^{R} P(i)\,\mathrm{rel}(i)$ with $P(i)$ the precision at
    rank $i$, whose mean over the queries is MAP@R.

    Args:
        embeddings: ``[N, D]`` finite floating-point embeddings, N ≥ 2 (any device).
        labels: ``[N]`` integer class labels.
        chunk_size: number of queries ranked at once.

    Returns:
        An `UncertaintyDetails` (without degradation values).

    Raises:
        ValueError: on malformed inputs, or if no class has two or more items.
    """
    x, y = _check_embeddings_labels(embeddings, labels)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    t = _per_query_tensors(x, y, chunk_size)
    return UncertaintyDetails(
        kappa=t["kappa"].cpu(), labels=y.cpu(), query_index=t["query_index"].cpu(), correct=t["correct"].cpu(),
        nearest=t["nearest"].cpu(), average_precision=t["average_precision"].cpu().to(torch.float64),
    )


def _uncertainty(
    embeddings: torch.Tensor, labels: torch.Tensor, rejection_fractions: Sequence[float], chunk_size: int
) -> tuple[dict[str, Any], UncertaintyDetails]:
    x, y = _check_embeddings_labels(embeddings, labels)
    fractions = _check_fractions(rejection_fractions)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    t = _per_query_tensors(x, y, chunk_size)
    acc = accumulator_dtype(x.device)
    kappa_all = t["kappa"]
    kappa_q = kappa_all[t["query_index"]]
    correct = t["correct"]
    num_queries = correct.numel()

    # accuracy–rejection: keep the most confident queries (ties in κ: the lower index is kept first)
    order = torch.sort(kappa_q, descending=True, stable=True).indices
    hits = correct[order].to(acc).cumsum(0)
    kept = [num_queries - min(num_queries - 1, math.floor(f * num_queries + 0.5)) for f in fractions]
    kept_t = torch.tensor(kept, device=x.device)
    curve = hits[kept_t - 1] / kept_t.to(acc)

    c = correct.to(acc)
    n_correct = c.sum()
    kq = kappa_q.to(acc)
    scalars = torch.stack([
        _auroc_tensor(kappa_q, correct),
        _spearman_tensor(kappa_q, t["average_precision"]) if num_queries > 1 else torch.tensor(math.nan, dtype=acc,
                                                                                                device=x.device),
        kappa_all.to(acc).mean(),
        kappa_all.to(acc).std(correction=0),
        c.mean(),
        (kq * c).sum() / n_correct.clamp_min(1),
        (kq * (1 - c)).sum() / (num_queries - n_correct).clamp_min(1),
        n_correct,
    ])
    values = torch.cat([scalars, curve]).cpu().tolist()  # the one host sync at the end
    auroc_v, rho, mean_k, std_k, r1, k_correct, k_wrong, n_corr = values[:8]
    n_corr = int(round(n_corr))
    metrics: dict[str, Any] = {
        "auroc_kappa": _none_if_nan(auroc_v),
        "spearman_kappa_ap": _none_if_nan(rho),
        "rejection_curve": [[f, float(v)] for f, v in zip(fractions, values[8:])],
        "mean_kappa": float(mean_k),
        "std_kappa": float(std_k),
        "mean_kappa_correct": float(k_correct) if n_corr > 0 else None,
        "mean_kappa_wrong": float(k_wrong) if n_corr < num_queries else None,
        "recall@1": float(r1),
        "num_queries": int(num_queries),
        "num_correct": n_corr,
    }
    details = UncertaintyDetails(
        kappa=kappa_all.cpu(), labels=y.cpu(), query_index=t["query_index"].cpu(), correct=correct.cpu(),
        nearest=t["nearest"].cpu(), average_precision=t["average_precision"].cpu().to(torch.float64),
    )
    return metrics, details


def uncertainty_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    rejection_fractions: Sequence[float] = DEFAULT_REJECTION_FRACTIONS,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    r"""How well κ = ‖e‖ predicts retrieval success on a labelled embedding set.

    Every item $q$ with $R_q \ge 1$ other items of its class is a query (leave-one-out, cosine
    similarity of the L2-normalised embeddings, as `dml.metrics.retrieval_metrics`). With
    $c_q = \mathbb{1}[\text{the nearest neighbour of } q \text{ has its class}]$ and
    $\mathrm{AP@R}_q = \frac{1}{R_q}\sum_{i=1}^{R_q} P_q(i)\,\mathrm{rel}_q(i)$ (the MAP@R summand):

    * ``auroc_kappa`` — the AUROC of $\kappa_q$ for predicting $c_q$ (`auroc`:
      $\Pr[\kappa_+ > \kappa_-] + \frac12\Pr[\kappa_+ = \kappa_-]$ over correct / wrong query pairs);
      0.5 is an uninformative κ, 1 a κ that ranks every correct query above every wrong one. **None**
      when all queries are correct or all wrong (the AUROC is undefined then).
    * ``spearman_kappa_ap`` — Spearman's ρ between $\kappa_q$ and $\mathrm{AP@R}_q$ (`spearman`;
      average ranks for ties). None when either is constant over the queries.
    * ``rejection_curve`` — the accuracy–rejection curve: for every fraction $f$, ``[f, R@1 of the
      kept queries]`` after dropping the $\lfloor fQ + \frac12 \rfloor$ queries of lowest κ (at
      least one query is kept; among equal κ the query of lower index is kept first). A useful κ
      gives an increasing curve; a random one a flat curve at R@1.
    * ``mean_kappa``, ``std_kappa`` — mean and (population) standard deviation of κ over all N items.
    * ``mean_kappa_correct``, ``mean_kappa_wrong`` — mean κ of the correct and of the wrong queries
      (None where there are none), ``recall@1`` — the fraction of correct queries (equal to
      `dml.metrics`'s up to how ties in similarity are broken), ``num_queries``, ``num_correct``.

    Memory is bounded by ranking ``chunk_size`` queries at a time (a ``chunk_size × N`` block, then
    `torch.topk` with $k = \max_q R_q$); nothing of size $N \times N$ exists for $N >$ ``chunk_size``.
    Computed on the embeddings' device (float32, float64 input stays float64; ranks in float64), with
    two host synchronisations to size the loop and one at the end.

    Args:
        embeddings: ``[N, D]`` finite floating-point embeddings, N ≥ 2 (any device).
        labels: ``[N]`` integer class labels.
        rejection_fractions: the fractions $f \in [0, 1)$ of the rejection curve.
        chunk_size: number of queries ranked at once.

    Returns:
        The dict above; JSON-serialisable (floats, ints, None, lists).

    Raises:
        ValueError: on malformed inputs, a fraction outside $[0, 1)$, or if no class has two or more
            items.

    References:
        * M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on
          Proxy-based Deep Metric Learning", ECCV 2022.
        * M. S. A. Nadeem, J.-D. Zucker, B. Hanczar, "Accuracy-Rejection Curves (ARCs) for Comparing
          Classification Methods with a Reject Option", MLSB 2009.
        * K. Musgrave, S. Belongie, S.-N. Lim, "A Metric Learning Reality Check", ECCV 2020.
    """
    metrics, _ = _uncertainty(embeddings, labels, rejection_fractions, chunk_size)
    return metrics


def _columnwise_average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks along dim 0 of an ``[L, M]`` tensor (exact ties), by pairwise comparison (small L)."""
    acc = accumulator_dtype(x.device)
    less = (x.unsqueeze(1) < x.unsqueeze(0)).to(acc).sum(dim=1)  # [L, M]: #{j: x_j < x_i}
    equal = (x.unsqueeze(1) == x.unsqueeze(0)).to(acc).sum(dim=1)  # includes i itself
    return less + (equal + 1) / 2


def degradation_test(
    embed: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    levels: Sequence[float] = DEFAULT_LEVELS,
    kinds: Sequence[str] = ("blur", "downsample", "occlude"),
    batch_size: int = 64,
    seed: int = 0,
    return_kappa: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], dict[str, torch.Tensor]]:
    r"""Does κ fall as images are degraded? Mean κ per strength and its Spearman correlation with strength.

    Every image is degraded by every ``kind`` at every strength $s$ in ``levels`` (`blur`: Gaussian
    σ = s·min(H, W)/32 px; `downsample`: by the factor $8^s$ and back; `occlude`: a grey patch over the
    fraction $s$ of the area — see `degradation_parameter`), embedded with ``embed`` in batches of
    ``batch_size``, and $\kappa = \|e\|$ recorded. Strength 0 is the clean image for every kind
    (embedded once and shared). The occluder positions come from a CPU generator seeded with
    ``seed`` afresh for every level, so the occluder of an image sits at the same relative position at
    every strength; the result is deterministic for given (``seed``, ``batch_size``) and ``embed``.

    The paper's claim, that ambiguous images get a low κ, predicts a *negative* correlation.

    Args:
        embed: maps a ``[B, 3, H, W]`` batch in $[0, 1]$ to ``[B, D]`` embeddings, e.g. an
            `dml.models.EmbeddingModel` in eval mode (the caller wraps it in ``torch.no_grad()``).
        images: ``[N, 3, H, W]`` float images in $[0, 1]$, N ≥ 1, on the device ``embed`` expects.
        levels: strengths in $[0, 1]$ (in the order to report them).
        kinds: names of `DEGRADATIONS`.
        batch_size: images embedded at once.
        seed: seed of the occluder positions.
        return_kappa: also return the per-image κ.

    Returns:
        ``{"levels", "num_images", "seed", "kinds": {kind: {...}}, "mean_spearman",
        "mean_image_spearman", "mean_kappa"}``. Every ``kinds[kind]`` holds ``parameter``
        (``"sigma_px"``, ``"factor"`` or ``"area_fraction"``) and ``parameter_values`` (its value at
        every level, for these images' size); ``mean_kappa`` and ``std_kappa`` (mean and population
        standard deviation of κ over the images, per level); ``spearman`` (Spearman's ρ between strength
        and κ over all N·L (image, level) pairs, average ranks; None if undefined); and
        ``mean_image_spearman`` (the mean over images of the Spearman ρ between strength and that image's
        κ across the levels — free of the differences between images; images with constant κ are left
        out; None if none is left). At the top level ``mean_spearman`` / ``mean_image_spearman`` are the
        means of those over the kinds (None-valued kinds left out) and ``mean_kappa`` is, per level, the
        mean over kinds.
        All JSON-serialisable. With ``return_kappa``, a tuple ``(result, {kind: [L, N] κ on the CPU})``.

    Raises:
        ValueError: on malformed images, an unknown kind, a strength outside $[0, 1]$, fewer than one
            level, or if ``embed`` does not return ``[B, D]``.

    References:
        M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based
        Deep Metric Learning", ECCV 2022 (κ of images under increasing corruption).
    """
    images = _check_images(images)
    n, _, h, w = images.shape
    if n < 1:
        raise ValueError("images must hold at least one image")
    levels = tuple(_check_strength(s) for s in levels)
    if not levels:
        raise ValueError("levels must hold at least one strength")
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in DEGRADATIONS:
            raise ValueError(f"unknown degradation {kind!r}; valid: {', '.join(DEGRADATIONS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    def kappas(kind: str | None, strength: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(seed))
        out = []
        for start in range(0, n, batch_size):
            batch = images[start : start + batch_size]
            x = batch if kind is None else degrade(kind, batch, strength, generator)
            e = embed(x)
            if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[0] != batch.shape[0]:
                raise ValueError(f"embed must return a [B, D] tensor for a batch of B = {batch.shape[0]} images, got "
                                 f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}")
            out.append(e.detach().float().norm(dim=1))
        return torch.cat(out)

    clean = kappas(None, 0.0) if 0.0 in levels else None
    acc = accumulator_dtype(images.device)
    per_kind: dict[str, torch.Tensor] = {}
    stats = []
    strengths = torch.tensor(levels, dtype=acc, device=images.device)
    for kind in kinds:
        k = torch.stack([clean if s == 0.0 and clean is not None else kappas(kind, s) for s in levels])  # [L, N]
        per_kind[kind] = k
        kd = k.to(acc)
        pooled = _spearman_tensor(strengths.repeat_interleave(n), kd.reshape(-1)) if len(levels) > 1 else \
            torch.tensor(math.nan, dtype=acc, device=images.device)
        # per image: ρ across the levels (strength ranks need no ties handling: levels are distinct or tied alike)
        rs = _columnwise_average_ranks(strengths.unsqueeze(1).expand(-1, n))
        rk = _columnwise_average_ranks(kd)
        rs, rk = rs - rs.mean(0), rk - rk.mean(0)
        den = (rs.square().sum(0) * rk.square().sum(0)).sqrt()
        valid = den > 0
        rho_img = (rs * rk).sum(0) / den.clamp_min(torch.finfo(acc).tiny)
        mean_img = torch.where(valid.any(), (rho_img * valid).sum() / valid.sum().clamp_min(1),
                               torch.tensor(math.nan, dtype=acc, device=images.device))
        stats.append(torch.cat([kd.mean(1), kd.std(1, correction=0), pooled.view(1), mean_img.view(1)]))
    values = torch.stack(stats).cpu().tolist() if stats else []  # one host sync
    num_levels = len(levels)
    names = {"blur": "sigma_px", "downsample": "factor", "occlude": "area_fraction"}
    result_kinds: dict[str, Any] = {}
    for kind, row in zip(kinds, values):
        result_kinds[kind] = {
            "parameter": names[kind],
            "parameter_values": [degradation_parameter(kind, s, h, w) for s in levels],
            "mean_kappa": [float(v) for v in row[:num_levels]],
            "std_kappa": [float(v) for v in row[num_levels : 2 * num_levels]],
            "spearman": _none_if_nan(row[2 * num_levels]),
            "mean_image_spearman": _none_if_nan(row[2 * num_levels + 1]),
        }

    def mean_of(key: str) -> float | None:
        vals = [r[key] for r in result_kinds.values() if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    result = {
        "levels": list(levels),
        "num_images": int(n),
        "seed": int(seed),
        "kinds": result_kinds,
        "mean_spearman": mean_of("spearman"),
        "mean_image_spearman": mean_of("mean_image_spearman"),
        "mean_kappa": [float(np.mean([r["mean_kappa"][i] for r in result_kinds.values()])) for i in range(num_levels)]
        if result_kinds else [],
    }
    if return_kappa:
        return result, {kind: k.cpu() for kind, k in per_kind.items()}
    return result


# --------------------------------------------------------------------------------------------------
# a trained model


def evaluate_uncertainty(
    model: torch.nn.Module,
    test_split: Any,
    test_embeddings: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    resolution: int,
    device: torch.device | str,
    batch_size: int = 64,
    seed: int = 0,
    degradation_images: int = 128,
    levels: Sequence[float] = DEFAULT_LEVELS,
    kinds: Sequence[str] = ("blur", "downsample", "occlude"),
    rejection_fractions: Sequence[float] = DEFAULT_REJECTION_FRACTIONS,
    chunk_size: int = 1024,
) -> tuple[dict[str, Any], UncertaintyDetails]:
    r"""All uncertainty metrics of a trained model on its test split.

    Runs `uncertainty_metrics` on ``test_embeddings`` (the embeddings the retrieval metrics were
    computed from) and `degradation_test` on ``degradation_images`` test images drawn without
    replacement by a permutation seeded with ``seed`` (all of them if there are fewer), loaded as the
    evaluation loads them: ``dml.data.ImageDataset(test_split, EvalTransform(resolution),
    max_side=round(resolution·256/224))``. The model embeds them in eval mode under
    ``torch.no_grad()``; its training mode is restored afterwards.

    Two return values keep the JSON apart from the tensors: the first is what goes into
    ``final_metrics.json``, the second what `dml.report.write_report` needs for its plots.

    Args:
        model: an `dml.models.EmbeddingModel` (its ``forward`` maps ``[B, 3, H, W]`` float images in
            $[0, 1]$ to embeddings), already on ``device``. Under DDP pass the unwrapped module.
        test_split: the `dml.data.Split` the embeddings belong to (same order).
        test_embeddings: ``[N, D]`` embeddings of the test split.
        test_labels: ``[N]`` their labels.
        resolution: the evaluation crop size in pixels.
        device: where the degradation-test images go.
        batch_size: images embedded at once in the degradation test.
        seed: seed of the image subset and of the occluder positions.
        degradation_images: how many test images the degradation test uses (0: skip it).
        levels: degradation strengths (`degradation_test`).
        kinds: degradations (`degradation_test`).
        rejection_fractions: as `uncertainty_metrics`.
        chunk_size: as `uncertainty_metrics`.

    Returns:
        ``(metrics, details)``: ``metrics`` is the dict of `uncertainty_metrics` plus ``degradation``
        (the dict of `degradation_test`, or None when skipped), JSON-serialisable; ``details`` the
        `UncertaintyDetails` (per-image κ, per-query correctness and AP@R, the degradation κ per image
        and the indices of the degradation images), not JSON-serialisable.

    Raises:
        ValueError: as `uncertainty_metrics` and `degradation_test`, or if the split and the
            embeddings differ in length.
        dml.data.DatasetError: if a test image cannot be decoded.
    """
    from dml.data import EvalTransform, ImageDataset, eval_resize

    if len(test_split) != test_embeddings.shape[0]:
        raise ValueError(f"test_split has {len(test_split)} images but test_embeddings {test_embeddings.shape[0]} rows")
    metrics, details = _uncertainty(test_embeddings, test_labels, rejection_fractions, chunk_size)
    n = len(test_split)
    count = min(max(0, int(degradation_images)), n)
    metrics["degradation"] = None
    if count == 0:
        return metrics, details
    index = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:count].sort().values
    dataset = ImageDataset(test_split, EvalTransform(resolution), max_side=eval_resize(resolution), cache=False)
    images = torch.stack([dataset[i][0] for i in index.tolist()]).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            both = degradation_test(lambda x: model(x).float(), images, levels=levels, kinds=kinds,
                                    batch_size=batch_size, seed=seed, return_kappa=True)
            degradation, kappa = cast(tuple[dict[str, Any], dict[str, torch.Tensor]], both)
    finally:
        model.train(was_training)
    metrics["degradation"] = degradation
    details.degradation_kappa = kappa
    details.degradation_index = index
    return metrics, details
