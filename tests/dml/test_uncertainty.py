"""dml.uncertainty: AUROC / Spearman against sklearn / scipy, per-query retrieval against dml.evaluation,
a constructed embedding set whose confident queries are exactly the correct ones, the degradations, the
degradation test with a fake embedder, and evaluate_uncertainty on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import roc_auc_score

from dml.data import load_splits
from dml.data.degradations import blur, degradation_parameter, downsample, occlude
from dml.metrics import retrieval_metrics
from dml.models import build_model
from dml.pipeline import evaluation_embeddings
from dml.uncertainty import (
    DEFAULT_LEVELS,
    auroc,
    average_ranks,
    degradation_test,
    evaluate_uncertainty,
    kappa_is_concentration,
    per_query_uncertainty,
    spearman,
    uncertainty_metrics,
)

# --------------------------------------------------------------------------------------------------
# ranks, AUROC, Spearman


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_ranks_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 50).astype(float)  # many ties
    np.testing.assert_allclose(average_ranks(torch.tensor(x)).numpy(), rankdata(x, method="average"))
    y = rng.normal(size=40)
    np.testing.assert_allclose(average_ranks(torch.tensor(y)).numpy(), rankdata(y))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tied", [False, True])
def test_auroc_matches_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    n = 120
    positive = rng.random(n) < 0.35
    scores = rng.normal(size=n) + positive * 0.7
    if tied:
        scores = np.round(scores)  # heavy ties, across the two classes too
    expected = roc_auc_score(positive, scores)
    assert auroc(torch.tensor(scores), torch.tensor(positive)) == pytest.approx(expected, abs=1e-12)
    # float32 scores and 0/1 integer targets give the same
    assert auroc(torch.tensor(scores, dtype=torch.float32), torch.tensor(positive.astype(int))) == pytest.approx(
        roc_auc_score(positive, scores.astype(np.float32)), abs=1e-12)


def test_auroc_limits_and_undefined():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert auroc(s, torch.tensor([False, False, True, True])) == 1.0
    assert auroc(s, torch.tensor([True, True, False, False])) == 0.0
    assert auroc(torch.ones(4), torch.tensor([True, False, True, False])) == 0.5  # all tied
    assert auroc(s, torch.ones(4, dtype=torch.bool)) is None
    assert auroc(s, torch.zeros(4, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="same length"):
        auroc(s, torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spearman_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, 80).astype(float)  # ties
    b = a + rng.normal(size=80)
    c = np.round(rng.normal(size=80), 1)  # ties
    for x, y in ((a, b), (a, c), (b, c)):
        assert spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_undefined_is_none():
    assert spearman(torch.ones(5), torch.arange(5.0)) is None
    assert spearman(torch.tensor([1.0]), torch.tensor([2.0])) is None
    assert spearman(torch.arange(5.0), -torch.arange(5.0)) == pytest.approx(-1.0)


# --------------------------------------------------------------------------------------------------
# retrieval-based metrics


def _random_set(seed, n=240, d=12, classes=30):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g)
    x = centres[labels] + 0.9 * torch.randn(n, d, generator=g)
    x = x * (0.5 + 3 * torch.rand(n, 1, generator=g))
    return x, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_per_query_values_agree_with_dml_evaluation(seed):
    x, labels = _random_set(seed)
    reference = retrieval_metrics(x, labels)
    details = per_query_uncertainty(x, labels, chunk_size=17)
    assert float(details.correct.double().mean()) == pytest.approx(reference["recall@1"], abs=1e-12)
    assert float(details.average_precision.mean()) == pytest.approx(reference["map@r"], abs=1e-9)
    torch.testing.assert_close(details.kappa, x.norm(dim=1))
    metrics = uncertainty_metrics(x, labels, chunk_size=17)
    assert metrics["recall@1"] == pytest.approx(reference["recall@1"], abs=1e-12)
    assert metrics["rejection_curve"][0] == [0.0, pytest.approx(reference["recall@1"], abs=1e-12)]
    # chunking changes nothing
    one = uncertainty_metrics(x, labels, chunk_size=1)
    assert one["rejection_curve"] == metrics["rejection_curve"] and one["num_correct"] == metrics["num_correct"]
    assert one["auroc_kappa"] == pytest.approx(metrics["auroc_kappa"], abs=1e-12)
    assert one["spearman_kappa_ap"] == pytest.approx(metrics["spearman_kappa_ap"], abs=1e-12)


def test_metrics_equal_sklearn_and_scipy_on_the_per_query_values():
    x, labels = _random_set(3)
    metrics = uncertainty_metrics(x, labels)
    d = per_query_uncertainty(x, labels)
    kappa = d.kappa[d.query_index].double().numpy()
    assert metrics["auroc_kappa"] == pytest.approx(roc_auc_score(d.correct.numpy(), kappa), abs=1e-12)
    assert metrics["spearman_kappa_ap"] == pytest.approx(
        spearmanr(kappa, d.average_precision.numpy()).statistic, abs=1e-12)
    assert metrics["mean_kappa"] == pytest.approx(float(x.norm(dim=1).double().mean()), rel=1e-6)
    assert metrics["std_kappa"] == pytest.approx(float(x.norm(dim=1).double().std(correction=0)), rel=1e-5)
    json.dumps(metrics)  # JSON-serialisable


def _confident_are_correct():
    """6 'good' classes: two items on (almost) the same axis direction, large norms (10..21); 4 'bad'
    classes: items half-way towards a good axis and towards another one, so their 1-NN is a good item
    of another class, small norms (1..1.7). Good queries' 1-NN is their partner (cosine ≈ 1 > 0.89)."""
    d = 16
    e = torch.eye(d, dtype=torch.float64)
    xs, ys = [], []
    for c in range(6):
        xs += [(10 + c) * e[c], (16 + c) * (e[c] + 0.01 * e[15])]
        ys += [c, c]
    for k in range(4):
        xs += [(1 + 0.1 * k) * (e[k] + 0.5 * e[6 + 2 * k]), (1.35 + 0.1 * k) * (e[k + 1] + 0.5 * e[7 + 2 * k])]
        ys += [6 + k, 6 + k]
    return torch.stack(xs), torch.tensor(ys)


def test_confident_queries_exactly_the_correct_ones():
    x, labels = _confident_are_correct()
    d = per_query_uncertainty(x, labels)
    assert d.correct.tolist() == [True] * 12 + [False] * 8
    metrics = uncertainty_metrics(x, labels)
    assert metrics["auroc_kappa"] == 1.0
    assert metrics["num_queries"] == 20 and metrics["num_correct"] == 12
    assert metrics["spearman_kappa_ap"] > 0.8
    assert metrics["mean_kappa_correct"] > 10 > 2 > metrics["mean_kappa_wrong"]
    curve = metrics["rejection_curve"]
    assert [f for f, _ in curve] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    values = [v for _, v in curve]
    assert values[0] == pytest.approx(12 / 20)
    assert all(b >= a for a, b in zip(values, values[1:])) and values[-1] == 1.0
    assert values[1] == pytest.approx(12 / 18)  # 2 of 20 dropped, both wrong
    assert values[4] == 1.0  # the 8 wrong ones are the 40% least confident
    # the reverse (confident = wrong) gives AUROC 0 and a falling curve
    flipped = x / x.norm(dim=1, keepdim=True) * (30 - x.norm(dim=1, keepdim=True))
    reverse = uncertainty_metrics(flipped, labels)
    assert reverse["auroc_kappa"] == 0.0
    assert reverse["rejection_curve"][-1][1] < reverse["rejection_curve"][0][1]


def test_all_correct_gives_none_not_nan():
    x = torch.tensor([[5.0, 0.0], [4.0, 0.1], [0.0, 3.0], [0.1, 2.0]])
    metrics = uncertainty_metrics(x, torch.tensor([0, 0, 1, 1]))
    assert metrics["recall@1"] == 1.0
    assert metrics["auroc_kappa"] is None and metrics["mean_kappa_wrong"] is None
    assert "NaN" not in json.dumps(metrics)


def test_uncertainty_metrics_input_errors():
    x, labels = _random_set(0, n=20)
    with pytest.raises(ValueError, match="no class has two"):
        uncertainty_metrics(x[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="rejection fraction"):
        uncertainty_metrics(x, labels, rejection_fractions=(0.0, 1.0))
    with pytest.raises(ValueError, match="length"):
        uncertainty_metrics(x, labels[:-1])
    with pytest.raises(ValueError, match="finite"):
        uncertainty_metrics(x * float("nan"), labels)


def test_kappa_is_concentration():
    assert kappa_is_concentration("el_nivmf") and kappa_is_concentration("el_nivmf_paper")
    assert kappa_is_concentration("el_vmf") and kappa_is_concentration("kl_vmf")
    assert not kappa_is_concentration("proxy_anchor") and not kappa_is_concentration("l2")
    with pytest.raises(ValueError, match="unknown loss"):
        kappa_is_concentration("nope")


# --------------------------------------------------------------------------------------------------
# degradations


def _images(seed=0, b=4, h=32, w=40):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _high_frequency_energy(x):
    """Mean squared discrete Laplacian (interior pixels), per image, float64."""
    x = x.double()
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
    return lap.square().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("fn", [blur, downsample, occlude])
def test_degradations_identity_at_zero_range_and_shape(fn):
    x = _images()
    assert torch.equal(fn(x, 0.0), x)
    for s in DEFAULT_LEVELS:
        y = fn(x, s)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.equal(fn(x, 0.5), x)
    with pytest.raises(ValueError, match="strength"):
        fn(x, 1.5)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        fn(x[0], 0.5)


def test_degradations_deterministic():
    x = _images()
    assert torch.equal(blur(x, 0.6), blur(x, 0.6))
    assert torch.equal(downsample(x, 0.6), downsample(x, 0.6))
    a = occlude(x, 0.3, torch.Generator().manual_seed(7))
    b = occlude(x, 0.3, torch.Generator().manual_seed(7))
    c = occlude(x, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("fn", [blur, downsample])
def test_blur_and_downsample_remove_high_frequencies_monotonically(fn):
    x = _images(b=3, h=48, w=48)
    energy = torch.stack([_high_frequency_energy(fn(x, s)) for s in DEFAULT_LEVELS])  # [L, B]
    assert bool((energy[1:] < energy[:-1]).all()), energy
    assert bool((energy[-1] < 0.1 * energy[0]).all())


def test_degradation_parameters():
    assert degradation_parameter("blur", 1.0, 224, 300) == pytest.approx(7.0)
    assert degradation_parameter("downsample", 0.5, 224, 224) == pytest.approx(8 ** 0.5)
    assert degradation_parameter("occlude", 0.25, 224, 224) == 0.25
    with pytest.raises(ValueError, match="unknown degradation"):
        degradation_parameter("rain", 0.5, 10, 10)


def test_occlude_covers_the_fraction_in_one_square():
    x = torch.zeros(6, 3, 40, 40)
    for s in (0.25, 0.5, 1.0):
        y = occlude(x, s, torch.Generator().manual_seed(0))
        grey = (y == 0.5).all(dim=1)  # [B, H, W]
        assert grey.double().mean(dim=(1, 2)).tolist() == pytest.approx([round(40 * s ** 0.5) ** 2 / 1600] * 6)
        rows, cols = grey.any(dim=2), grey.any(dim=1)
        # one axis-aligned block: the grey pixels are exactly the product of its rows and columns
        assert torch.equal(grey, rows[:, :, None] & cols[:, None, :])


# --------------------------------------------------------------------------------------------------
# the degradation test


def _fake_embed(x):
    """Direction fixed, norm 1 + 100 × high-frequency energy (rounded): strictly decreasing under blur,
    identical for flipped copies of an image."""
    kappa = torch.round((1 + 100 * _high_frequency_energy(x)) * 1e6) / 1e6
    direction = torch.zeros(x.shape[0], 4, dtype=torch.float64)
    direction[:, 0] = 1
    return direction * kappa[:, None]


def test_degradation_test_fake_embed_blur_spearman_minus_one():
    base = _images(seed=1, b=1, h=32, w=32)
    images = torch.cat([base, base.flip(-1), base.flip(-2), base.flip(-1, -2)])
    result, kappa = degradation_test(_fake_embed, images, batch_size=3, seed=0, return_kappa=True)
    blur_result = result["kinds"]["blur"]
    assert blur_result["spearman"] == pytest.approx(-1.0)
    assert blur_result["mean_image_spearman"] == pytest.approx(-1.0)
    assert all(b < a for a, b in zip(blur_result["mean_kappa"], blur_result["mean_kappa"][1:]))
    assert blur_result["parameter"] == "sigma_px" and blur_result["parameter_values"][-1] == pytest.approx(1.0)
    assert set(result["kinds"]) == {"blur", "downsample", "occlude"}
    assert result["levels"] == list(DEFAULT_LEVELS) and result["num_images"] == 4
    assert kappa["blur"].shape == (5, 4)
    for kind in ("downsample", "occlude"):  # the clean level is shared by every kind
        assert torch.equal(kappa[kind][0], kappa["blur"][0])
    spearmans = [r["spearman"] for r in result["kinds"].values()]
    assert result["mean_spearman"] == pytest.approx(float(np.mean(spearmans)))
    assert len(result["mean_kappa"]) == 5
    json.dumps(result)
    # deterministic
    assert degradation_test(_fake_embed, images, batch_size=3, seed=0) == result


def test_degradation_test_constant_embed_and_errors():
    images = _images(b=3, h=16, w=16)
    result = degradation_test(lambda x: torch.ones(x.shape[0], 3), images, kinds=("occlude",))
    assert result["kinds"]["occlude"]["spearman"] is None  # κ constant: undefined, not NaN
    assert result["kinds"]["occlude"]["mean_image_spearman"] is None and result["mean_spearman"] is None
    with pytest.raises(ValueError, match="unknown degradation"):
        degradation_test(_fake_embed, images, kinds=("rain",))
    with pytest.raises(ValueError, match="embed must return"):
        degradation_test(lambda x: torch.ones(3), images)


# --------------------------------------------------------------------------------------------------
# a trained (here: random) model


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("unc_data")
    rng = np.random.default_rng(0)
    for c in range(8):
        d = root / f"class_{c}"
        d.mkdir()
        colour = rng.integers(0, 256, 3)
        for i in range(3):
            img = rng.integers(0, 128, (20, 20, 3)).astype(np.uint8)
            img[4:14, 4:14] = colour
            Image.fromarray(img).save(d / f"{i}.png")
    return load_splits("folder", root, val_fraction=0.0, split_seed=0)


def test_evaluate_uncertainty_on_a_tiny_model(tiny_splits):
    torch.manual_seed(0)
    model = build_model("tiny", 8, weights=None)
    test = tiny_splits.test
    embeddings, labels = evaluation_embeddings(model, test, frozen=False, resolution=32, device=torch.device("cpu"),
                                               batch_size=5)
    model.train()
    metrics, details = evaluate_uncertainty(model, test, embeddings, labels, resolution=32, device="cpu",
                                            batch_size=5, seed=1, degradation_images=7)
    assert model.training  # mode restored
    json.dumps(metrics)
    assert metrics["degradation"]["num_images"] == 7
    assert set(metrics) >= {"auroc_kappa", "spearman_kappa_ap", "rejection_curve", "mean_kappa", "std_kappa",
                            "degradation"}
    assert details.kappa.shape == (len(test),) and details.degradation_index.shape == (7,)
    assert details.degradation_kappa["blur"].shape == (5, 7)
    again, _ = evaluate_uncertainty(model, test, embeddings, labels, resolution=32, device="cpu", batch_size=5,
                                    seed=1, degradation_images=7)
    assert again == metrics
    none, _ = evaluate_uncertainty(model, test, embeddings, labels, resolution=32, device="cpu",
                                   degradation_images=0)
    assert none["degradation"] is None
