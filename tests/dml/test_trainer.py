"""dml.trainer.Trainer on its own, with a tiny in-memory model and data (no files read, no CLI): the loop,
the checkpoints, and an exact restore; and dml.build, which turns a config into parts without changing it
(issue #13, finding 13)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dml.build import RunParts, build_optimizer, build_run, build_scheduler, load_data
from dml.config import TrainConfig, resolve
from dml.data import ClassBalancedBatchSampler, Split, Splits
from dml.losses import build_loss
from dml.models import build_model
from dml.trainer import Trainer
from tests.dml.tiny_runs import make_folder_dataset


class TensorPipeline:
    """Training batches and evaluation embeddings from images held in memory."""

    def __init__(self, model, images: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]):
        self.model, self.images, self.labels = model, images, labels

    def train_batches(self, batches, epoch, start=0):
        for step in range(start, len(batches)):
            index = torch.as_tensor(batches[step])
            yield self.images["train"][index], self.labels["train"][index]

    def embed_train(self, inputs):
        return self.model(inputs)

    @torch.no_grad()
    def embed_split(self, name):
        was = self.model.training
        self.model.eval()
        out = self.model(self.images[name])
        self.model.train(was)
        return out, self.labels[name]


def _split(n_classes: int, per_class: int) -> Split:
    labels = tuple(c for c in range(n_classes) for _ in range(per_class))
    return Split(tuple(f"img{i}.png" for i in range(len(labels))), labels, tuple(f"c{c}" for c in range(n_classes)))


def tiny_parts(epochs: int = 2) -> RunParts:
    """Parts with a constant learning rate (no warm-up), so that runs of different lengths share steps."""
    config = TrainConfig(backbone="tiny", weights="none", embed_dim=8, trunk="finetune", epochs=epochs, lr=1e-3,
                         batch_size=8, samples_per_class=2, loss="norm_softmax", device="cpu", seed=1,
                         scheduler="constant", warmup_epochs=0.0)
    torch.manual_seed(0)
    splits = Splits("memory", _split(6, 4), _split(3, 2), _split(3, 2), "")
    g = torch.Generator().manual_seed(0)
    images = {name: torch.rand(len(getattr(splits, name)), 3, 16, 16, generator=g) for name in ("train", "val", "test")}
    labels = {name: torch.tensor(getattr(splits, name).labels) for name in images}
    model = build_model("tiny", 8, weights=None)
    loss = build_loss("norm_softmax", num_classes=6, embed_dim=8)
    sampler = ClassBalancedBatchSampler(splits.train.labels, 8, 2, seed=1)
    optimizer = build_optimizer(config, model, loss)
    return RunParts(config=config, device=torch.device("cpu"), splits=splits, model=model, loss=loss,
                    pipeline=TensorPipeline(model, images, labels),  # type: ignore[arg-type]
                    sampler=sampler, optimizer=optimizer, scheduler=build_scheduler(config, optimizer, len(sampler)),
                    resolution=16)


def test_fit_trains_validates_and_checkpoints(tmp_path):
    parts = tiny_parts(epochs=2)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    trainer = Trainer(parts, tmp_path, quiet=True, checkpoint_extra={"data": {"digest": "x"}})
    trainer.fit(has_val=True)
    assert trainer.epoch == 2 and len(trainer.history) == 2
    assert {"loss", "accuracy"} <= set(trainer.history[0]["train"]) and "recall@1" in trainer.history[0]["val"]
    assert any(not torch.equal(before[k], v) for k, v in parts.model.state_dict().items())
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    assert last["epoch"] == 2 and last["data"] == {"digest": "x"} and last["history"] == trainer.history
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["epoch"] == trainer.best["epoch"]
    assert (tmp_path / "history.jsonl").read_text().count("\n") == 2


def test_restore_continues_exactly(tmp_path):
    """One epoch, a fresh trainer restored from last.pt, one more epoch == two epochs in one go."""
    straight = Trainer(tiny_parts(epochs=2), tmp_path / "a", quiet=True)
    straight.fit(has_val=True)
    first = Trainer(tiny_parts(epochs=1), tmp_path / "b", quiet=True)
    first.fit(has_val=True)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    resumed = Trainer(tiny_parts(epochs=2), tmp_path / "b", quiet=True)
    resumed.restore(state)
    resumed.fit(has_val=True)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]


def test_resolve_sets_the_trunk_learning_rate_of_a_partial_trunk():
    """--trunk partial trains its few trunk layers at 3 × lr by default (PARTIAL_TRUNK_LR_MULT); the
    optimizer's trunk group gets exactly that rate, the head lr × head_lr_mult; other trunks 1 ×."""
    from dml.build import make_model
    from dml.config import PARTIAL_TRUNK_LR_MULT
    from dml.losses import build_loss

    partial = resolve(TrainConfig(backbone="tiny", weights="none", embed_dim=8, trunk="partial"), "cpu")
    assert partial.trunk_lr_mult == PARTIAL_TRUNK_LR_MULT == 3.0 and partial.lr == 1e-4
    assert resolve(TrainConfig(trunk="finetune"), "cpu").trunk_lr_mult == 1.0
    assert resolve(TrainConfig(trunk="partial", trunk_lr_mult=2.0), "cpu").trunk_lr_mult == 2.0
    optimizer = build_optimizer(partial, make_model(partial), build_loss("norm_softmax", num_classes=3, embed_dim=8))
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates["trunk"] == pytest.approx(3e-4) and rates["head"] == pytest.approx(1e-3)


def test_auto_trunk_is_partial_on_cpu_and_finetune_on_gpu():
    """--trunk auto: the partial trunk on a CPU (20 epochs, trunk at 3 × lr), fine-tuning on CUDA, and
    fine-tuning wherever the weights are random (a frozen random trunk gives random features)."""
    cpu = resolve(TrainConfig(), "cpu")
    assert (cpu.trunk, cpu.epochs, cpu.trunk_lr_mult) == ("partial", 20, 3.0)
    gpu = resolve(TrainConfig(), "cuda")
    assert (gpu.trunk, gpu.epochs, gpu.trunk_lr_mult) == ("finetune", 30, 1.0)
    assert resolve(TrainConfig(weights="none"), "cpu").trunk == "finetune"
    assert resolve(TrainConfig(trunk="frozen"), "cpu").epochs == 40


def test_auto_trunk_falls_back_to_frozen_when_the_activation_cache_would_not_fit(tmp_path, monkeypatch):
    """--trunk auto → partial only if twice its activation cache (per process) fits in a quarter of the
    memory; otherwise frozen, with its own default epochs, and a line saying why. --trunk partial is
    never overridden."""
    import dml.build
    from dml.build import AUTO_PARTIAL_MEMORY_FRACTION, fit_auto_trunk, partial_cache_bytes

    data = make_folder_dataset(tmp_path / "data", classes=8)
    requested = TrainConfig(dataset="folder", data_root=str(data), backbone="resnet50", batch_size=4,
                            output_dir=str(tmp_path / "r"))
    resolved = resolve(requested, "cpu")
    splits = load_data(resolved)
    assert resolved.trunk == "partial"
    images = len(splits.train) + len(splits.val) + len(splits.test)
    assert partial_cache_bytes(resolved, splits) == images * 4 * 1024 * 14 * 14  # ResNet-50 at 224 px
    needed = 2 * 2 * partial_cache_bytes(resolved, splits)  # two processes
    lines = []
    monkeypatch.setattr(dml.build, "machine_memory_bytes", lambda: int(needed / AUTO_PARTIAL_MEMORY_FRACTION))
    assert fit_auto_trunk(requested, resolved, splits, "cpu", 2, lines.append) is resolved and not lines
    monkeypatch.setattr(dml.build, "machine_memory_bytes", lambda: int(needed / AUTO_PARTIAL_MEMORY_FRACTION) - 1)
    frozen = fit_auto_trunk(requested, resolved, splits, "cpu", 2, lines.append)
    assert (frozen.trunk, frozen.epochs, frozen.trunk_lr_mult) == ("frozen", 40, 1.0)
    assert len(lines) == 1 and "auto chose FROZEN" in lines[0] and "--trunk partial" in lines[0]
    explicit = dataclasses.replace(requested, trunk="partial", epochs=7)
    assert fit_auto_trunk(explicit, resolve(explicit, "cpu"), splits, "cpu", 2, lines.append).trunk == "partial"
    assert fit_auto_trunk(dataclasses.replace(requested, epochs=7), dataclasses.replace(resolved, epochs=7),
                          splits, "cpu", 2, lines.append).epochs == 7  # an explicit --epochs is kept


def test_build_run_does_not_change_the_config(tmp_path):
    data = make_folder_dataset(tmp_path / "data", classes=8)
    config = resolve(TrainConfig(dataset="folder", data_root=str(data), backbone="tiny", weights="none", embed_dim=8,
                                 batch_size=4, device="cpu", trunk="auto", loss="el_vmf",
                                 output_dir=str(tmp_path / "run")), "cpu")
    assert config.trunk == "finetune" and config.epochs == 30 and config.lr == 1e-4  # resolve returns a copy
    frozen = copy.deepcopy(config)
    parts = build_run(config, load_data(config), torch.device("cpu"), log=lambda line: None)
    assert dataclasses.asdict(config) == dataclasses.asdict(frozen)
    assert parts.config is config
    # the pipeline's precision settings come with its construction, not set afterwards
    assert parts.pipeline.autocast_dtype is None and parts.pipeline.channels_last is False
    assert not (tmp_path / "run").exists()  # building writes nothing
