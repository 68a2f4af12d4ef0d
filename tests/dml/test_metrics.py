"""Tests of dml.evaluation: retrieval metrics against a plain numpy brute force and hand-worked
examples, NMI against scikit-learn, k-means on separated blobs, and input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from dml.metrics import (
    cross_domain_metrics,
    evaluate_embeddings,
    kmeans,
    nmi,
    normalized_mutual_info,
    retrieval_metrics,
)

# --------------------------------------------------------------------------------------------------
# brute-force reference: full distance matrix, argsort, one query at a time


def brute_force_metrics(emb: np.ndarray, labels: np.ndarray, ks, distance: str) -> dict[str, float]:
    x = emb.astype(np.float64)
    n = x.shape[0]
    if distance == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = 1.0 - x @ x.T
    else:
        dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    recalls = {k: [] for k in ks}
    aps, rps = [], []
    for q in range(n):
        r = int((labels == labels[q]).sum()) - 1
        if r == 0:
            continue  # singleton class: not a query
        others = [j for j in range(n) if j != q]
        order = [others[i] for i in np.argsort(dist[q, others])]
        rel = [labels[j] == labels[q] for j in order]
        for k in ks:
            recalls[k].append(1.0 if any(rel[:k]) else 0.0)
        rps.append(sum(rel[:r]) / r)
        ap = 0.0
        for i in range(r):  # rank i + 1
            if rel[i]:
                ap += sum(rel[: i + 1]) / (i + 1)
        aps.append(ap / r)
    out = {f"recall@{k}": float(np.mean(recalls[k])) for k in ks}
    out["map@r"] = float(np.mean(aps))
    out["r_precision"] = float(np.mean(rps))
    return out


def min_gap_between_neighbours(emb: np.ndarray, distance: str) -> float:
    """The smallest difference between two scores of the same query, on the scale the library ranks:
    cosine similarity of unit vectors, squared distance of the centred data scaled to max norm 1."""
    x = emb.astype(np.float64)
    if distance == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        score = x @ x.T
    else:
        x = x - x.mean(axis=0)
        x = x / np.linalg.norm(x, axis=1).max()
        score = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    gaps = [np.diff(np.sort(np.delete(score[q], q))).min() for q in range(x.shape[0])]
    return float(min(gaps))


# Scores of vectors of norm ≤ 1 in D = 6 dimensions are computed in float32 with an absolute error of a
# few D·2⁻²⁴ ≈ 4e-7; data whose scores are at least MIN_GAP apart are ranked exactly as in float64.
MIN_GAP = 2e-6


CLASS_SIZES = [1, 1, 2, 2, 3, 5, 8, 13, 1, 4]  # several sizes, three singletons; N = 40


def random_data(seed: int = 0, dim: int = 6):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASS_SIZES)), CLASS_SIZES)
    rng.shuffle(labels)
    # weakly clustered, with varying norms (the Euclidean metrics see them)
    centres = rng.normal(size=(len(CLASS_SIZES), dim))
    emb = centres[labels] + 1.5 * rng.normal(size=(labels.size, dim))
    emb *= rng.uniform(0.5, 3.0, size=(labels.size, 1))
    return emb.astype(np.float32), labels


KS = (1, 2, 4, 8, 100)  # 100 > N − 1: counts all other items


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_brute_force(chunk_size, seed):
    emb, labels = random_data(seed)
    for distance in ("cosine", "euclidean"):
        assert min_gap_between_neighbours(emb, distance) > MIN_GAP  # float32 rounding cannot reorder
    got = retrieval_metrics(torch.from_numpy(emb), torch.from_numpy(labels), ks=KS, chunk_size=chunk_size)
    for distance, suffix in (("cosine", ""), ("euclidean", "_euclidean")):
        ref = brute_force_metrics(emb, labels, KS, distance)
        for name, value in ref.items():
            assert got[name + suffix] == pytest.approx(value, rel=1e-12, abs=1e-12), (name + suffix, chunk_size)
    expected_keys = {f"recall@{k}{s}" for k in KS for s in ("", "_euclidean")}
    expected_keys |= {"map@r", "r_precision", "map@r_euclidean", "r_precision_euclidean"}
    assert set(got) == expected_keys
    assert all(isinstance(v, float) for v in got.values())


def brute_force_cross_domain(emb: np.ndarray, labels: np.ndarray, domains: np.ndarray, ks) -> dict[str, float]:
    """Cosine retrieval of each query among the items of the other domains only, one query at a time."""
    x = emb.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - x @ x.T
    recalls = {k: [] for k in ks}
    aps, rps = [], []
    for q in range(x.shape[0]):
        gallery = [j for j in range(x.shape[0]) if domains[j] != domains[q]]
        r = sum(labels[j] == labels[q] for j in gallery)
        if r == 0:
            continue
        order = [gallery[i] for i in np.argsort(dist[q, gallery])]
        rel = [labels[j] == labels[q] for j in order]
        for k in ks:
            recalls[k].append(1.0 if any(rel[:k]) else 0.0)
        rps.append(sum(rel[:r]) / r)
        aps.append(sum(sum(rel[: i + 1]) / (i + 1) for i in range(r) if rel[i]) / r)
    out = {f"recall@{k}": float(np.mean(recalls[k])) for k in ks}
    out.update({"map@r": float(np.mean(aps)), "r_precision": float(np.mean(rps)), "num_queries": float(len(aps))})
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_cross_domain_matches_brute_force(chunk_size, seed):
    emb, labels = random_data(seed)
    assert min_gap_between_neighbours(emb, "cosine") > MIN_GAP
    domains = np.random.default_rng(seed + 10).integers(0, 3, size=labels.size)  # some classes in one domain only
    got = cross_domain_metrics(torch.from_numpy(emb), torch.from_numpy(labels), torch.from_numpy(domains), ks=KS,
                               chunk_size=chunk_size)
    ref = brute_force_cross_domain(emb, labels, domains, KS)
    assert set(got) == set(ref)
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, chunk_size)
    assert 0 < got["num_queries"] < labels.size


def test_cross_domain_ignores_the_same_domain():
    """Two classes drawn in two styles: within a style the pictures of different classes are nearest
    (style dominates), across styles the same class is: R@1 is 0 leave-one-out, 1 cross-domain."""
    emb = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.3], [-1.0, -0.3]])  # style = sign of x
    labels = torch.tensor([0, 1, 0, 1])
    domains = torch.tensor([0, 0, 1, 1])
    assert retrieval_metrics(emb, labels, ks=(1,))["recall@1"] == 0.0
    cross = cross_domain_metrics(emb, labels, domains, ks=(1,))
    assert cross["recall@1"] == 1.0 and cross["map@r"] == 1.0 and cross["num_queries"] == 4.0
    with pytest.raises(ValueError, match="another domain"):
        cross_domain_metrics(emb, labels, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-negative"):
        cross_domain_metrics(emb, labels, torch.tensor([0, -1, 0, 1]))
    with pytest.raises(ValueError, match="domains must have length"):
        cross_domain_metrics(emb, labels, torch.tensor([0, 1]))


def test_retrieval_dtypes():
    emb, labels = random_data(3)
    assert min(min_gap_between_neighbours(emb, d) for d in ("cosine", "euclidean")) > MIN_GAP
    y = torch.from_numpy(labels).to(torch.int32)
    ref = retrieval_metrics(torch.from_numpy(emb).double(), y)
    assert retrieval_metrics(torch.from_numpy(emb), y) == ref  # same ordering in float32 and float64
    bf16 = torch.from_numpy(emb).to(torch.bfloat16)
    assert retrieval_metrics(bf16, y) == retrieval_metrics(bf16.float(), y)  # upcast, then identical


def test_chunking_never_forms_n_by_n(monkeypatch):
    """Every similarity block has at most chunk_size rows."""
    emb, labels = random_data(3)
    shapes = []
    original = torch.Tensor.topk

    def spy(self, *args, **kwargs):
        shapes.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    retrieval_metrics(torch.from_numpy(emb), torch.from_numpy(labels), chunk_size=5)
    assert shapes and all(rows <= 5 and cols == emb.shape[0] for rows, cols in shapes)


# --------------------------------------------------------------------------------------------------
# hand-worked examples: points on the unit circle at angles t (in units of 0.1 rad, all within 1 rad),
# so cosine and Euclidean (chord) distance both order the items by |Δt|. Classes named X, Y, ... are
# singletons (never queries, but retrieved by the others).


def circle(ts) -> torch.Tensor:
    a = 0.1 * torch.tensor(ts, dtype=torch.float64)
    return torch.stack([torch.cos(a), torch.sin(a)], dim=1).float()


def test_map_at_r_musgrave_example():
    # t:      Y=-4  X=-2  A0=0  A1=1  A2=3  A3=5.5     (class A has 4 items: R = 3 for each)
    # A0: A1 (1), X (2), A2 (3), Y (4), A3 (5.5)  -> rel 1,0,1 in the top 3:
    #     MAP@R = (1/3)(1/1 + 2/3) = 5/9 = 0.5556, R-precision = 2/3
    # A1: A0 (1), A2 (2), X (3), A3 (4.5), Y (5)  -> rel 1,1,0: MAP@R = (1/3)(1 + 1) = 2/3, RP = 2/3
    # A2: A1 (2), A3 (2.5), A0 (3), X (5), Y (7)  -> rel 1,1,1: MAP@R = 1, RP = 1
    # A3: A2 (2.5), A1 (4.5), A0 (5.5), ...        -> rel 1,1,1: MAP@R = 1, RP = 1
    # mean MAP@R = (5/9 + 6/9 + 9/9 + 9/9)/4 = 29/36 = 0.80556; mean RP = (2/3 + 2/3 + 1 + 1)/4 = 5/6
    # every nearest neighbour is of class A: Recall@1 = 1
    emb = circle([-4, -2, 0, 1, 3, 5.5])
    labels = torch.tensor([10, 11, 0, 0, 0, 0])
    m = retrieval_metrics(emb, labels, ks=(1,))
    for s in ("", "_euclidean"):
        assert m["map@r" + s] == pytest.approx(29 / 36, rel=1e-12)
        assert m["r_precision" + s] == pytest.approx(5 / 6, rel=1e-12)
        assert m["recall@1" + s] == 1.0
    assert evaluate_embeddings(emb, labels, ks=(1,), with_nmi=False)["num_queries"] == 4.0


def test_map_at_r_first_hit_missed():
    # t:      A1=-2  A0=0  X=1  A2=3      (class A has 3 items: R = 2)
    # A0: X (1), A1 (2), A2 (3)   -> rel 0,1: MAP@R = (1/2)(1/2) = 0.25, RP = 1/2; hit at rank 2
    # A1: A0 (2), X (3), A2 (5)   -> rel 1,0: MAP@R = (1/2)(1/1) = 0.5,  RP = 1/2; hit at rank 1
    # A2: X (2), A0 (3), A1 (5)   -> rel 0,1: MAP@R = 0.25, RP = 1/2;           hit at rank 2
    # mean MAP@R = 1/3, RP = 1/2, Recall@1 = 1/3, Recall@2 = Recall@4 = 1
    emb = circle([-2, 0, 1, 3])
    labels = torch.tensor([0, 0, 7, 0])
    m = retrieval_metrics(emb, labels, ks=(1, 2, 4), chunk_size=2)
    for s in ("", "_euclidean"):
        assert m["map@r" + s] == pytest.approx(1 / 3, rel=1e-12)
        assert m["r_precision" + s] == pytest.approx(1 / 2, rel=1e-12)
        assert m["recall@1" + s] == pytest.approx(1 / 3, rel=1e-12)
        assert m["recall@2" + s] == 1.0
        assert m["recall@4" + s] == 1.0


def test_norms_matter_for_euclidean_only():
    # A0 = (1, 0), A1 = (5, 0.5), B0 = (1, 0.3), B1 = (1, -0.35); every R = 1.
    # angles: A0 0, A1 0.0997, B0 0.2915, B1 -0.3367
    # cosine (by |Δangle|):
    #   A0: A1 .0997, B0 .2915, B1 .3367   -> rel at rank 1: AP 1, R@1 1
    #   A1: A0 .0997, B0 .1918, B1 .4364   -> rank 1: AP 1, R@1 1
    #   B0: A1 .1918, A0 .2915, B1 .6282   -> rank 3: AP 0, R@1 0, R@2 0
    #   B1: A0 .3367, A1 .4364, B0 .6282   -> rank 3: AP 0, R@1 0, R@2 0
    #   => Recall@1 = Recall@2 = MAP@R = RP = 1/2, Recall@4 = 1
    # Euclidean (A1 is far away because of its norm):
    #   A0: B0 0.30, B1 0.35, A1 4.031     -> rank 3
    #   A1: B0 4.005, A0 4.031, B1 4.089   -> rank 2
    #   B0: A0 0.30, B1 0.65, A1 4.005     -> rank 2
    #   B1: A0 0.35, B0 0.65, A1 4.089     -> rank 2
    #   => Recall@1 = MAP@R = RP = 0 (R = 1: only rank 1 counts), Recall@2 = 3/4, Recall@4 = 1
    emb = torch.tensor([[1.0, 0.0], [5.0, 0.5], [1.0, 0.3], [1.0, -0.35]])
    labels = torch.tensor([0, 0, 1, 1])
    m = retrieval_metrics(emb, labels, ks=(1, 2, 4))
    assert m == pytest.approx(
        {
            "recall@1": 0.5, "recall@2": 0.5, "recall@4": 1.0, "map@r": 0.5, "r_precision": 0.5,
            "recall@1_euclidean": 0.0, "recall@2_euclidean": 0.75, "recall@4_euclidean": 1.0,
            "map@r_euclidean": 0.0, "r_precision_euclidean": 0.0,
        },
        rel=1e-12, abs=1e-12,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# separated clusters and random labels


def blobs(sizes, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(len(sizes), dim, generator=g), dim=1) * 10.0
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    return centres[labels] + spread * torch.randn(labels.numel(), dim, generator=g), labels


def test_perfectly_separated_clusters():
    emb, labels = blobs([8, 5, 12, 3, 9], dim=16, spread=0.01, seed=0)
    m = evaluate_embeddings(emb, labels * 3 + 100)  # arbitrary label values
    for key, value in m.items():
        if key == "num_queries":
            assert value == emb.shape[0]
        else:
            assert value == pytest.approx(1.0, abs=1e-12), key
    assert set(m) >= {"nmi", "num_queries", "recall@8", "map@r_euclidean"}


def test_nmi_of_random_labels_is_near_zero():
    # Labels independent of the embeddings: the plug-in mutual information of two independent
    # labellings with a = b = 10 groups of N = 2000 items has expectation ≈ (a−1)(b−1)/(2N) = 0.02 nats
    # and standard deviation ≈ sqrt(2(a−1)(b−1))/(2N) ≈ 0.003 nats; both entropies are ≈ log 10 ≈ 2.3,
    # so NMI ≈ 0.009 ± 0.0014. The bound 0.02 is ~8 standard deviations above the mean.
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2000, 8, generator=g)
    labels = torch.randint(10, (2000,), generator=g)
    value = nmi(emb, labels, num_init=1)
    assert 0.0 <= value < 0.02


# --------------------------------------------------------------------------------------------------
# NMI against scikit-learn on fixed assignments


@pytest.mark.parametrize(
    "a, b",
    [
        ([0, 0, 1, 1], [1, 1, 0, 0]),
        ([0, 0, 0, 0], [0, 1, 2, 3]),
        ([5, 5, 5], [2, 2, 2]),
        ([0, 0, 0, 1], [3, 3, 3, 3]),
        ([-1, 4, 4, 9, 9, 9], [0, 0, 1, 1, 2, 2]),
    ],
)
def test_nmi_matches_sklearn_small(a, b):
    expected = normalized_mutual_info_score(a, b)
    assert normalized_mutual_info(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", range(4))
def test_nmi_matches_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 500))
    a = rng.integers(0, rng.integers(2, 30), size=n)
    b = np.where(rng.random(n) < 0.6, a, rng.integers(0, rng.integers(2, 30), size=n))  # correlated
    expected = normalized_mutual_info_score(a, b)
    assert normalized_mutual_info(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# k-means


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = torch.unique(torch.stack([a, b], dim=1), dim=0)
    return pairs.shape[0] == torch.unique(a).numel() == torch.unique(b).numel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_finds_separated_blobs(seed):
    x, labels = blobs([30, 5, 17, 50, 2, 11], dim=3, spread=0.3, seed=seed)
    clusters = kmeans(x, 6, seed=seed)
    assert clusters.dtype == torch.int64 and clusters.shape == labels.shape
    assert same_partition(clusters, labels)
    assert torch.equal(kmeans(x, 6, seed=seed), clusters)  # deterministic


def test_kmeans_edge_cases():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]])
    # fewer distinct points than clusters: duplicate centres, empty clusters re-seeded; no failure
    c = kmeans(x, 3, num_init=2)
    assert c.shape == (5,) and int(c.min()) >= 0 and int(c.max()) < 3
    assert not set(c[:2].tolist()) & set(c[2:].tolist())
    assert torch.equal(kmeans(x, 1), torch.zeros(5, dtype=torch.int64))
    y = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    assert sorted(kmeans(y, 7).tolist()) == list(range(7))  # k = N: one point per cluster


# --------------------------------------------------------------------------------------------------
# input checks


GOOD_EMB = torch.randn(6, 3)
GOOD_LAB = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize(
    "emb, lab, kwargs, match",
    [
        (torch.randn(6), GOOD_LAB, {}, "embeddings must be 2-D"),
        (torch.randn(6, 3, 1), GOOD_LAB, {}, "embeddings must be 2-D"),
        (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), {}, "embeddings must have N >= 1"),
        (torch.ones(6, 3, dtype=torch.long), GOOD_LAB, {}, "embeddings must be a floating-point"),
        (GOOD_EMB.clone().index_fill_(0, torch.tensor([2]), math.nan), GOOD_LAB, {}, "embeddings must be finite"),
        (GOOD_EMB.clone().index_fill_(0, torch.tensor([2]), math.inf), GOOD_LAB, {}, "embeddings must be finite"),
        (GOOD_EMB.numpy(), GOOD_LAB, {}, "embeddings must be a torch.Tensor"),
        (GOOD_EMB, GOOD_LAB.float(), {}, "labels must have an integer dtype"),
        (GOOD_EMB, GOOD_LAB.bool(), {}, "labels must have an integer dtype"),
        (GOOD_EMB, GOOD_LAB.view(2, 3), {}, "labels must be 1-D"),
        (GOOD_EMB, GOOD_LAB[:5], {}, "labels must have length N = 6"),
        (GOOD_EMB, torch.arange(6), {}, "no class has two or more items"),
        (GOOD_EMB, GOOD_LAB, {"ks": ()}, "ks must be a non-empty sequence"),
        (GOOD_EMB, GOOD_LAB, {"ks": (1, 0)}, "every k in ks must be a positive integer"),
        (GOOD_EMB, GOOD_LAB, {"ks": (1.5,)}, "every k in ks must be a positive integer"),
        (GOOD_EMB, GOOD_LAB, {"chunk_size": 0}, "chunk_size must be a positive integer"),
    ],
)
def test_bad_input_retrieval(emb, lab, kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(emb, lab, **kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate_embeddings(emb, lab, **kwargs)


def test_bad_input_clustering():
    with pytest.raises(ValueError, match="labels must have length N = 6"):
        nmi(GOOD_EMB, GOOD_LAB[:4])
    with pytest.raises(ValueError, match="embeddings must be finite"):
        nmi(torch.full((6, 3), math.nan), GOOD_LAB)
    with pytest.raises(ValueError, match="k must be at most N = 6"):
        kmeans(GOOD_EMB, 7)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        kmeans(GOOD_EMB, 0)
    with pytest.raises(ValueError, match="num_init must be a positive integer"):
        kmeans(GOOD_EMB, 2, num_init=0)
    with pytest.raises(ValueError, match="x must be 2-D"):
        kmeans(torch.randn(5), 2)
    with pytest.raises(ValueError, match="labels_pred must have length N = 6"):
        normalized_mutual_info(GOOD_LAB, GOOD_LAB[:3])
    with pytest.raises(ValueError, match="labels_true must have an integer dtype"):
        normalized_mutual_info(GOOD_LAB.float(), GOOD_LAB)


# --------------------------------------------------------------------------------------------------
# accelerator


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    emb, labels = random_data(3)  # scores at least MIN_GAP apart (test_retrieval_dtypes)
    x, y = torch.from_numpy(emb), torch.from_numpy(labels)
    ref = evaluate_embeddings(x, y, chunk_size=7)
    gpu = evaluate_embeddings(x.cuda(), y.cuda(), chunk_size=7)
    assert set(gpu) == set(ref)
    for key in ref:
        if key != "nmi":  # k-means draws from the CUDA generator: another (valid) clustering
            assert gpu[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    assert 0.0 <= gpu["nmi"] <= 1.0
    half = x.cuda().half()  # upcast on the device, then the same computation
    assert retrieval_metrics(half, y.cuda(), chunk_size=7) == retrieval_metrics(half.float(), y.cuda(), chunk_size=7)
    clusters = kmeans(x.cuda(), 10, seed=3)
    assert clusters.device.type == "cuda" and torch.equal(clusters, kmeans(x.cuda(), 10, seed=3))
