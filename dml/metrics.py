r"""Retrieval and clustering metrics for image-retrieval embeddings.

The standard deep-metric-learning evaluation protocol: every embedding is a query against all *other*
embeddings (leave-one-out), and the metrics are

* Recall@k (the DML convention: the fraction of queries with at least one item of their class among
  their k nearest neighbours),
* R-precision and MAP@R (Musgrave et al., 2020), and
* NMI between the classes and a k-means clustering of the L2-normalised embeddings,

and, where every item carries a domain (the artist of an emoji picture), the cross-domain variant of the
retrieval metrics (`cross_domain_metrics`): a query searches only the items of the other domains.

Retrieval metrics are computed for two distances: cosine (on L2-normalised embeddings), the primary
one, and Euclidean on the raw embeddings, whose norms carry the von Mises–Fisher concentration.

Conventions shared by all retrieval metrics:

* For a query $q$ of class $y_q$, $R_q$ is the number of *other* items of class $y_q$. Queries with
  $R_q = 0$ (singleton classes) cannot retrieve anything relevant and are excluded from every retrieval
  metric (they still take part as items to be retrieved by other queries).
* Ties in the distances are broken by `torch.topk`, which does not specify an order; metrics of data
  with ties are therefore not uniquely defined.
* Queries are processed in chunks of ``chunk_size`` rows, so at most ``chunk_size × N`` similarities
  exist at once; nothing of size ``N × N`` is formed for ``N > chunk_size``. Everything runs on the
  embeddings' device in float32 (float16 and bfloat16 are upcast; float64 input is kept in float64),
  with a few host synchronisations to size the computation and one at the end.

References:
    * K. Musgrave, S. Belongie, S.-N. Lim, "A Metric Learning Reality Check", ECCV 2020.
    * H. Jégou, M. Douze, C. Schmid, "Product quantization for nearest neighbor search", IEEE TPAMI 33
      (2011) (Recall@k).
    * A. Strehl, J. Ghosh, "Cluster ensembles — a knowledge reuse framework for combining multiple
      partitions", JMLR 3 (2002) (NMI).
    * D. Arthur, S. Vassilvitskii, "k-means++: the advantages of careful seeding", SODA 2007.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "retrieval_metrics",
    "cross_domain_metrics",
    "nmi",
    "normalized_mutual_info",
    "kmeans",
    "evaluate_embeddings",
    "accumulator_dtype",
    "retrieval_queries",
    "ranked_chunks",
    "average_precision_at_r",
]

#: the number of elements of the per-chunk point × centre distance matrix in `kmeans`
_KMEANS_BLOCK_ELEMENTS = 1 << 24

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------------
# input checks


def _check_embeddings(embeddings: object, name: str = "embeddings") -> torch.Tensor:
    """Check a ``[N, D]`` finite floating-point tensor with N, D ≥ 1 and return it in float32/float64."""
    if not isinstance(embeddings, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"{name} must have N >= 1 rows and D >= 1 columns, got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {embeddings.dtype}")
    x = embeddings.detach()
    x = x if x.dtype == torch.float64 else x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return x


def _check_labels(labels: object, n: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    """Check a 1-D integer tensor of length ``n`` and return it as int64 on ``device``."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(labels.shape)}")
    if labels.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have length N = {n} (the number of embeddings), got {labels.shape[0]}")
    return labels.detach().to(device=device, dtype=torch.int64)


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_ks(ks: object) -> tuple[int, ...]:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(_check_positive_int(k, "every k in ks") for k in ks)


# --------------------------------------------------------------------------------------------------
# retrieval


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """The dtype that sums of per-query values use on ``device``: float64, float32 on MPS (no float64).

    Args:
        device: where the sums are computed.

    Returns:
        The dtype.
    """
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def retrieval_queries(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R per item (the number of other items of its class) and the indices of the queries (R ≥ 1).

    Args:
        y: ``[N]`` int64 labels.

    Returns:
        ``(r_all [N], queries [Q])``.

    Raises:
        ValueError: if no item has R ≥ 1.
    """
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    r_all = counts[inverse] - 1
    queries = torch.nonzero(r_all > 0).squeeze(1)  # host sync (sizes the loops)
    if queries.numel() == 0:
        raise ValueError("labels: no class has two or more items, so no query has a relevant item (R = 0 for all)")
    return r_all, queries


def ranked_chunks(
    scores_of: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, queries: torch.Tensor, top: int, chunk_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Leave-one-out retrieval of the queries in chunks: ``(q, nearest, rel)`` per chunk.

    ``scores_of(q)`` gives the ``[c, N]`` similarities of queries ``q`` to every item (higher is nearer);
    ``nearest`` is the ``[c, top]`` indices of the ``top`` nearest other items in order, ``rel`` whether
    each has the query's class. Never more than ``chunk_size × N`` scores at once.

    Args:
        scores_of: the similarity function.
        y: ``[N]`` labels.
        queries: ``[Q]`` query indices (`retrieval_queries`).
        top: how many neighbours to rank.
        chunk_size: queries per chunk.

    Yields:
        ``(q, nearest, rel)`` per chunk of queries.
    """
    for start in range(0, queries.numel(), chunk_size):
        q = queries[start : start + chunk_size]
        scores = scores_of(q)
        scores.scatter_(1, q.unsqueeze(1), -math.inf)  # leave-one-out: never retrieve the query
        nearest = scores.topk(top, dim=1).indices
        del scores
        yield q, nearest, y[nearest] == y[q].unsqueeze(1)


def average_precision_at_r(rel: torch.Tensor, rq: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    r"""AP@R per query: $\frac1R\sum_{i \le R} P(i)\,\mathrm{rel}(i)$ from ``rel`` [c, top] (ranks in order).

    Args:
        rel: ``[c, top]`` bool, whether the neighbour at each rank has the query's class.
        rq: ``[c]`` R of each query.
        acc: the accumulator dtype (`accumulator_dtype`).

    Returns:
        ``[c]`` AP@R values.
    """
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device)
    rel_f = rel.to(acc)
    precision_at = rel_f.cumsum(dim=1) / ranks.to(acc)
    within_r = ranks.unsqueeze(0) <= rq.unsqueeze(1)  # ranks 1..R
    return (precision_at * rel_f * within_r).sum(dim=1) / rq.to(acc)


def _retrieval_names(ks: Sequence[int]) -> list[str]:
    """The names of the values `_chunk_totals` sums, in its order."""
    return [f"recall@{k}" for k in ks] + ["map@r", "r_precision"]


def _chunk_totals(rel: torch.Tensor, rq: torch.Tensor, ranks: torch.Tensor, ks: Sequence[int],
                  acc: torch.dtype) -> torch.Tensor:
    """Sums over a chunk of queries of Recall@k (each k), AP@R and R-precision (`_retrieval_names`).

    Args:
        rel: ``[c, top]`` whether the neighbour at each rank is relevant.
        rq: ``[c]`` R of each query.
        ranks: ``1 .. top``.
        ks: the k of Recall@k.
        acc: the accumulator dtype.
    """
    recalls = [rel[:, :k].any(dim=1).to(acc).sum() for k in ks]
    hits_in_r = (rel.to(acc) * (ranks.unsqueeze(0) <= rq.unsqueeze(1))).sum(dim=1)
    return torch.stack([*recalls, average_precision_at_r(rel, rq, acc).sum(), (hits_in_r / rq.to(acc)).sum()])


def _retrieval(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], chunk_size: int
) -> tuple[dict[str, float], int]:
    """Check the inputs; return the retrieval metrics and the number of queries with R ≥ 1."""
    x = _check_embeddings(embeddings)
    n = x.shape[0]
    y = _check_labels(labels, n, x.device)
    ks = _check_ks(ks)
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    device, acc = x.device, accumulator_dtype(x.device)

    r_all, queries = retrieval_queries(y)
    num_queries = int(queries.numel())
    r_max = int(r_all.max())  # host sync (sizes topk)
    top = min(max(max(ks), r_max), n - 1)  # ≥ every R; never more than the N − 1 other items

    # cosine: unit vectors; Euclidean: ranked by 2⟨q, x⟩ − ‖x‖², on centred and rescaled embeddings
    # (order-preserving, and keeps the matmul form away from cancellation and overflow)
    unit = F.normalize(x, dim=1)
    centred = x - x.mean(dim=0)
    centred = centred / centred.norm(dim=1).max().clamp_min(torch.finfo(x.dtype).tiny)
    neg_sq_norm = centred.square().sum(dim=1).neg().unsqueeze(0)
    score_fns = {
        "": lambda q: unit[q] @ unit.T,
        "_euclidean": lambda q: torch.addmm(neg_sq_norm, centred[q], centred.T, alpha=2.0),
    }

    ranks = torch.arange(1, top + 1, device=device)
    totals = {}
    for suffix, scores_of in score_fns.items():  # one [c, N] block at a time
        total = torch.zeros(len(ks) + 2, dtype=acc, device=device)
        for q, _, rel in ranked_chunks(scores_of, y, queries, top, chunk_size):
            total += _chunk_totals(rel, r_all[q], ranks, ks, acc)
        totals[suffix] = total

    values = torch.cat([totals[""], totals["_euclidean"]]).cpu().tolist()  # the one sync at the end
    names = _retrieval_names(ks)
    out: dict[str, float] = {}
    for offset, suffix in ((0, ""), (len(names), "_euclidean")):
        for i, name in enumerate(names):
            out[name + suffix] = float(values[offset + i] / num_queries)
    return out, num_queries


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 1024,
) -> dict[str, float]:
    r"""Leave-one-out Recall@k, MAP@R and R-precision for cosine and Euclidean distance.

    Every item $q$ is a query against the $N - 1$ other items, ranked by increasing distance
    (cosine distance of the L2-normalised embeddings, or Euclidean distance of the raw embeddings). With
    $\mathrm{rel}(i) \in \{0, 1\}$ whether the item at rank $i$ has the query's class, $R$ the number of
    other items of that class and $P(i) = \frac{1}{i}\sum_{j \le i} \mathrm{rel}(j)$ the precision at
    rank $i$, the per-query values, averaged over the queries with $R \ge 1$, are

    * Recall@k $= \mathbb{1}\left[\sum_{i \le k} \mathrm{rel}(i) \ge 1\right]$ (at least one relevant
      item among the $k$ nearest; the deep-metric-learning convention, not the information-retrieval
      fraction of relevant items retrieved),
    * R-precision $= \frac{1}{R}\sum_{i=1}^{R} \mathrm{rel}(i)$,
    * MAP@R $= \frac{1}{R}\sum_{i=1}^{R} P(i)\,\mathrm{rel}(i)$.

    Queries with $R = 0$ (singleton classes) are excluded from all metrics, but are still retrieved by
    the other queries. Ties in distance are broken by `torch.topk` (in an unspecified order).

    Memory is bounded by processing ``chunk_size`` queries at a time: a ``chunk_size × N`` similarity
    block, the query masked with $-\infty$, then `torch.topk` with $k = \max(\max(\text{ks}), \max R)$.
    Computed on the embeddings' device in float32 (float64 input stays float64).

    Args:
        embeddings: ``[N, D]`` finite floating-point embeddings (any device).
        labels: ``[N]`` integer class labels.
        ks: the k of Recall@k, positive integers (a k beyond $N - 1$ counts all other items).
        chunk_size: number of queries processed at once.

    Returns:
        ``recall@k`` for each k in ``ks``, ``map@r`` and ``r_precision`` (cosine), and the same keys
        with the suffix ``_euclidean``, as Python floats.

    Raises:
        ValueError: if ``embeddings`` is not a finite 2-D floating-point tensor, ``labels`` not a 1-D
            integer tensor of length N, ``ks`` or ``chunk_size`` not positive integers, or if no query
            has $R \ge 1$.

    References:
        * K. Musgrave, S. Belongie, S.-N. Lim, "A Metric Learning Reality Check", ECCV 2020 (MAP@R,
          R-precision).
        * H. Oh Song, Y. Xiang, S. Jegelka, S. Savarese, "Deep Metric Learning via Lifted Structured
          Feature Embedding", CVPR 2016 (Recall@k in deep metric learning).
    """
    metrics, _ = _retrieval(embeddings, labels, ks, chunk_size)
    return metrics


def cross_domain_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 1024,
) -> dict[str, float]:
    r"""Recall@k, MAP@R and R-precision of cross-domain retrieval (cosine similarity).

    As `retrieval_metrics`, but a query $q$ of domain $d_q$ (e.g. the artist who drew it) searches only
    the items of the *other* domains: its gallery is $\{i : d_i \ne d_q\}$, and $R_q$ is the number of
    items of its class in other domains. So a model cannot score by finding the same artist's other
    pictures, only by recognising the emoji across styles. Queries with $R_q = 0$ (a class drawn in one
    domain only) are excluded.

    Args:
        embeddings: ``[N, D]`` finite floating-point embeddings (any device).
        labels: ``[N]`` integer class labels.
        domains: ``[N]`` non-negative integer domain of each item.
        ks: the k of Recall@k, positive integers.
        chunk_size: number of queries processed at once.

    Returns:
        ``recall@k`` for each k, ``map@r``, ``r_precision`` and ``num_queries``, as Python floats.

    Raises:
        ValueError: bad inputs as in `retrieval_metrics`, a negative domain, or no query with an item of
            its class in another domain.
    """
    x = _check_embeddings(embeddings)
    n = x.shape[0]
    y = _check_labels(labels, n, x.device)
    d = _check_labels(domains, n, x.device, name="domains")
    ks = _check_ks(ks)
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    if n and int(d.min()) < 0:
        raise ValueError("domains must be non-negative integers")
    acc = accumulator_dtype(x.device)
    _, class_of, class_counts = torch.unique(y, return_inverse=True, return_counts=True)
    _, pair_of, pair_counts = torch.unique(class_of * (int(d.max()) + 1) + d, return_inverse=True, return_counts=True)
    r_all = class_counts[class_of] - pair_counts[pair_of]  # items of the class in the other domains
    queries = torch.nonzero(r_all > 0).squeeze(1)
    if queries.numel() == 0:
        raise ValueError("domains: no item has an item of its class in another domain (R = 0 for all)")
    top = min(max(max(ks), int(r_all.max())), n - 1)
    unit = F.normalize(x, dim=1)
    ranks = torch.arange(1, top + 1, device=x.device)
    total = torch.zeros(len(ks) + 2, dtype=acc, device=x.device)
    for start in range(0, queries.numel(), chunk_size):
        q = queries[start : start + chunk_size]
        scores = unit[q] @ unit.T
        scores.masked_fill_(d[q].unsqueeze(1) == d.unsqueeze(0), -math.inf)  # the query's own domain, itself too
        values, nearest = scores.topk(top, dim=1)
        del scores
        # a masked item is never relevant (ranked last when the gallery is smaller than top)
        rel = (y[nearest] == y[q].unsqueeze(1)) & (values > -math.inf)
        total += _chunk_totals(rel, r_all[q], ranks, ks, acc)
    values_out = (total / queries.numel()).cpu().tolist()  # the one sync at the end
    out = {name: float(v) for name, v in zip(_retrieval_names(ks), values_out)}
    out["num_queries"] = float(queries.numel())
    return out


# --------------------------------------------------------------------------------------------------
# clustering


def _sq_dist_argmin(x: torch.Tensor, sq_norm: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre and squared distance to it for every row of ``x``, in row blocks."""
    k = centres.shape[0]
    c_sq = centres.square().sum(dim=1)
    block = max(1, _KMEANS_BLOCK_ELEMENTS // k)
    assign, min_d2 = [], []
    for start in range(0, x.shape[0], block):
        xb = x[start : start + block]
        d2 = torch.addmm(c_sq.unsqueeze(0), xb, centres.T, alpha=-2.0)  # ‖c‖² − 2⟨x, c⟩
        d, a = d2.min(dim=1)
        assign.append(a)
        min_d2.append((d + sq_norm[start : start + block]).clamp_min(0.0))
    return torch.cat(assign), torch.cat(min_d2)


def _cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the points of every cluster, as one-hot matrix products in row blocks (deterministic on
    GPUs, unlike float atomics in ``index_add_``)."""
    block = max(1, _KMEANS_BLOCK_ELEMENTS // k)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], block):
        one_hot = F.one_hot(assign[start : start + block], k).to(x.dtype)
        sums.addmm_(one_hot.T, x[start : start + block])
    return sums


def _kmeans_pp(x: torch.Tensor, sq_norm: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding: each next centre is the best (lowest inertia) of 2 + ⌊log k⌋ candidates
    drawn with probability ∝ squared distance to the nearest centre chosen so far."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=gen, device=x.device)
    centres = [x[first]]
    min_d2 = (sq_norm - 2.0 * (x @ x[first].T).squeeze(1) + sq_norm[first]).clamp_min(0.0)
    for _ in range(1, k):
        # all points coincide with chosen centres (fewer distinct points than k): draw uniformly
        weights = torch.where(min_d2.sum() > 0, min_d2, torch.ones_like(min_d2))
        cand = torch.multinomial(weights, trials, replacement=True, generator=gen)
        d2 = (sq_norm.unsqueeze(0) - 2.0 * (x[cand] @ x.T) + sq_norm[cand].unsqueeze(1)).clamp_min(0.0)
        d2 = torch.minimum(d2, min_d2.unsqueeze(0))  # [trials, N]
        best = d2.sum(dim=1).argmin()
        centres.append(x[cand[best]].unsqueeze(0))
        min_d2 = d2[best]
    return torch.cat(centres)


def _lloyd(x: torch.Tensor, sq_norm: torch.Tensor, centres: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, float]:
    """Lloyd iterations from ``centres``; returns the final assignment and its inertia."""
    k = centres.shape[0]
    assign, min_d2 = _sq_dist_argmin(x, sq_norm, centres)
    for _ in range(max_iter):
        counts = torch.bincount(assign, minlength=k)
        empty = torch.nonzero(counts == 0).squeeze(1).tolist()
        if empty:
            # re-seed each empty cluster at the point farthest from its centre
            far = torch.topk(min_d2, len(empty)).indices
            assign = assign.clone()
            assign[far] = torch.tensor(empty, device=x.device)
            counts = torch.bincount(assign, minlength=k)
        sums = _cluster_sums(x, assign, k)
        centres = torch.where(
            (counts > 0).unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype), centres
        )
        new_assign, min_d2 = _sq_dist_argmin(x, sq_norm, centres)
        converged = torch.equal(new_assign, assign)
        assign = new_assign
        if converged:
            break
    return assign, float(min_d2.sum())


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, num_init: int = 3, max_iter: int = 100) -> torch.Tensor:
    r"""k-means clustering (Lloyd's algorithm with k-means++ seeding and restarts).

    Minimises the inertia $\sum_n \min_j \|x_n - c_j\|^2$: ``num_init`` times, centres are seeded by
    greedy k-means++ (the first uniformly; for each next one, $2 + \lfloor \log k \rfloor$ candidates
    are drawn with probability proportional to the squared distance to the nearest centre chosen so far,
    and the one giving the lowest inertia is kept, as in scikit-learn) from a `torch.Generator` seeded
    with ``seed`` on ``x``'s device, then refined by at most ``max_iter`` Lloyd iterations (assign every
    point to its nearest centre, move every centre to the mean of its points) until the assignment no longer changes. A
    cluster left empty is re-seeded at the point farthest from its centre. The run of lowest inertia is
    kept (the first one on ties).

    Deterministic for a given seed on a given device. The data are centred and rescaled first, which
    changes no assignment. Memory: blocks of at most $2^{24}$ point–centre distances.

    Args:
        x: ``[N, D]`` finite floating-point points (any device).
        k: number of clusters, $1 \le k \le N$.
        seed: seed of the k-means++ draws.
        num_init: number of k-means++ restarts.
        max_iter: maximal number of Lloyd iterations per restart.

    Returns:
        The cluster index in ``[0, k)`` of every row, an int64 tensor of shape ``[N]`` on ``x``'s
        device.

    Raises:
        ValueError: if ``x`` is not a finite 2-D floating-point tensor, or ``k``, ``num_init`` or
            ``max_iter`` are not positive integers, or ``k > N``.

    References:
        * S. Lloyd, "Least squares quantization in PCM", IEEE Trans. Inf. Theory 28 (1982).
        * D. Arthur, S. Vassilvitskii, "k-means++: the advantages of careful seeding", SODA 2007.
    """
    points = _check_embeddings(x, "x")
    k = _check_positive_int(k, "k")
    num_init = _check_positive_int(num_init, "num_init")
    max_iter = _check_positive_int(max_iter, "max_iter")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if k > points.shape[0]:
        raise ValueError(f"k must be at most N = {points.shape[0]} (the number of points), got {k}")

    points = points - points.mean(dim=0)
    points = points / points.norm(dim=1).max().clamp_min(torch.finfo(points.dtype).tiny)
    sq_norm = points.square().sum(dim=1)
    gen = torch.Generator(device=points.device)
    gen.manual_seed(int(seed))

    best_assign, best_inertia = None, math.inf
    for _ in range(num_init):
        centres = _kmeans_pp(points, sq_norm, k, gen)
        assign, inertia = _lloyd(points, sq_norm, centres, max_iter)
        if inertia < best_inertia or best_assign is None:
            best_assign, best_inertia = assign, inertia
    assert best_assign is not None  # num_init >= 1
    return best_assign


def normalized_mutual_info(labels_true: torch.Tensor, labels_pred: torch.Tensor) -> float:
    r"""Normalised mutual information of two labellings, arithmetic normalisation.

    With $n_{ij}$ the number of items with class $i$ and cluster $j$, $a_i = \sum_j n_{ij}$,
    $b_j = \sum_i n_{ij}$ and $N = \sum_{ij} n_{ij}$,

    $$
    I = \sum_{ij} \frac{n_{ij}}{N} \log\frac{N n_{ij}}{a_i b_j}, \qquad
    H(U) = -\sum_i \frac{a_i}{N}\log\frac{a_i}{N}, \qquad
    \mathrm{NMI} = \frac{I}{(H(U) + H(V))/2},
    $$

    as scikit-learn's ``normalized_mutual_info_score`` with its default ``average_method="arithmetic"``,
    including its limits: 1 when both labellings consist of a single cluster, 0 when $I = 0$ otherwise.
    Computed in float64 on the host.

    Args:
        labels_true: ``[N]`` integer labels (the classes).
        labels_pred: ``[N]`` integer labels (the clusters).

    Returns:
        NMI in $[0, 1]$.

    Raises:
        ValueError: if the labellings are not 1-D integer tensors of the same length N ≥ 1.

    References:
        * A. Strehl, J. Ghosh, "Cluster ensembles — a knowledge reuse framework for combining multiple
          partitions", JMLR 3 (2002).
        * N. X. Vinh, J. Epps, J. Bailey, "Information theoretic measures for clusterings comparison",
          JMLR 11 (2010).
    """
    if not isinstance(labels_true, torch.Tensor) or labels_true.dim() != 1 or labels_true.shape[0] < 1:
        raise ValueError("labels_true must be a non-empty 1-D torch.Tensor")
    a = _check_labels(labels_true, labels_true.shape[0], torch.device("cpu"), "labels_true").numpy()
    b = _check_labels(labels_pred, a.shape[0], torch.device("cpu"), "labels_pred").numpy()
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    na, nb = int(ai.max()) + 1, int(bi.max()) + 1
    if na == nb == 1:
        return 1.0  # neither labelling splits the data: a perfect match
    if na == 1 or nb == 1:
        return 0.0  # one labelling has zero entropy, so I = 0
    n = float(a.shape[0])
    contingency = np.bincount(ai * nb + bi, minlength=na * nb).reshape(na, nb).astype(np.float64)
    row, col = contingency.sum(axis=1), contingency.sum(axis=0)
    i, j = np.nonzero(contingency)
    nij = contingency[i, j]
    mi = float(np.clip(np.sum(nij / n * (np.log(nij) + np.log(n) - np.log(row[i]) - np.log(col[j]))), 0.0, None))
    if mi <= 0.0:
        return 0.0
    h_true = float(-np.sum(row / n * np.log(row / n)))
    h_pred = float(-np.sum(col / n * np.log(col / n)))
    return float(min(1.0, mi / ((h_true + h_pred) / 2.0)))


def nmi(
    embeddings: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, num_init: int = 3, max_iter: int = 100
) -> float:
    r"""NMI between the classes and a k-means clustering of the L2-normalised embeddings.

    The embeddings are normalised to unit length and clustered by `kmeans` with $k$ the number of
    distinct labels; the result is `normalized_mutual_info` (arithmetic normalisation,
    $\mathrm{NMI} = I(Y; C) / \frac{1}{2}(H(Y) + H(C))$) of labels and clusters.

    Args:
        embeddings: ``[N, D]`` finite floating-point embeddings (any device).
        labels: ``[N]`` integer class labels.
        seed: seed of the k-means++ initialisation.
        num_init: number of k-means restarts.
        max_iter: maximal number of Lloyd iterations per restart.

    Returns:
        NMI in $[0, 1]$.

    Raises:
        ValueError: if ``embeddings`` is not a finite 2-D floating-point tensor or ``labels`` not a 1-D
            integer tensor of length N.

    References:
        * A. Strehl, J. Ghosh, "Cluster ensembles — a knowledge reuse framework for combining multiple
          partitions", JMLR 3 (2002).
        * H. Oh Song, Y. Xiang, S. Jegelka, S. Savarese, "Deep Metric Learning via Lifted Structured
          Feature Embedding", CVPR 2016 (NMI of k-means clusterings in deep metric learning).
    """
    x = _check_embeddings(embeddings)
    y = _check_labels(labels, x.shape[0], x.device)
    k = int(torch.unique(y).numel())
    clusters = kmeans(F.normalize(x, dim=1), k, seed=seed, num_init=num_init, max_iter=max_iter)
    return normalized_mutual_info(y, clusters)


def evaluate_embeddings(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 1024,
    seed: int = 0,
    with_nmi: bool = True,
) -> dict[str, float]:
    r"""All evaluation metrics of a set of embeddings: `retrieval_metrics`, `nmi` and the query count.

    Args:
        embeddings: ``[N, D]`` finite floating-point embeddings (any device).
        labels: ``[N]`` integer class labels.
        ks: the k of Recall@k.
        chunk_size: number of queries processed at once.
        seed: seed of the k-means initialisation of the NMI.
        with_nmi: compute the NMI (k-means is the most expensive part for many classes).

    Returns:
        The keys of `retrieval_metrics` (``recall@k``, ``map@r``, ``r_precision`` and their
        ``_euclidean`` counterparts), ``nmi`` (if ``with_nmi``) and ``num_queries``, the number of
        queries with $R \ge 1$ that the retrieval metrics average over, all as Python floats.

    Raises:
        ValueError: as `retrieval_metrics` and `nmi`.
    """
    metrics, num_queries = _retrieval(embeddings, labels, ks, chunk_size)
    if with_nmi:
        metrics["nmi"] = nmi(embeddings, labels, seed=seed)
    metrics["num_queries"] = float(num_queries)
    return metrics
