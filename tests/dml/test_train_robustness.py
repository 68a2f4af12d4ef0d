"""Regression tests for defects a review of the dml trainer found (issue #5), all fixed: option
parsing, up-front flag checks, divergence, exact resume, Ctrl-C advice, host syncs, Cars196 class order.

Each comment block describes the defect as it was. All runs are tiny (tiny backbone, generated folder
data, CPU).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dml import trainer as train_module
from dml.checkpoint import load_checkpoint
from dml.config import parse_config
from dml.data import load_splits
from dml.losses import LOSSES, build_loss
from dml.pipeline import FeaturePipeline
from dml.train import main
from tests.dml.tiny_runs import make_folder_dataset
from tests.dml.tiny_runs import tiny_args as _args


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("review_data"))


def _assert_one_line_usage_error(code, err):
    assert code == 2, f"exit code {code}, stderr: {err[-300:]}"
    assert err.startswith("error: ") and err.count("\n") == 1, err[-300:]


# ------------------------------------------------------------------------------------------------
# 1. config.py `_parse_value` maps "0"/"1" to False/True before trying JSON, so the documented
#    `--loss-option guidance_weight=0` ("0 disables"), `temperature_lr_mult=0` ("0 keeps T fixed"),
#    `num_samples=1`, `temperature=1`, `rho=1` become booleans, which every loss rejects
#    ("guidance_weight must be a finite number >= 0, got False").


def test_loss_option_zero_and_one_are_numbers_not_booleans():
    config = parse_config(["--loss-option", "guidance_weight=0", "--loss-option", "num_samples=1",
                           "--loss-option", "temperature_lr_mult=0", "--loss-option", "temperature=1"])
    for key, value in config.loss_options.items():
        assert not isinstance(value, bool), (key, value)
    build_loss("el_nivmf", num_classes=4, embed_dim=8, **config.loss_options)


# ------------------------------------------------------------------------------------------------
# 2. train.py evaluates validation with with_nmi=False and never checks --selection-metric, so
#    `--selection-metric nmi` (or a typo) trains a whole epoch and then dies with a KeyError traceback.


def test_selection_metric_nmi_works_or_is_rejected_up_front(data_root, tmp_path, capsys):
    code = main(_args(data_root, tmp_path / "run", "--loss", "cosine", "--trunk", "frozen", "--epochs", "1",
                      "--selection-metric", "nmi"))
    err = capsys.readouterr().err
    if code != 0:
        _assert_one_line_usage_error(code, err)


# ------------------------------------------------------------------------------------------------
# 3. Invalid numeric flags and unusable splits end in tracebacks (ZeroDivisionError, ValueError,
#    RuntimeError, KeyError) instead of the one-line "error: ..." that main() gives other usage errors.


@pytest.mark.parametrize("flags", [
    ["--samples-per-class", "0"],   # ZeroDivisionError in Trainer.__init__ (batch_size % samples_per_class)
    ["--batch-size", "0"],          # ValueError from ClassBalancedBatchSampler
    ["--log-every", "0"],           # ZeroDivisionError inside the first epoch
    ["--eval-batch-size", "0"],     # ValueError: range() arg 3 must not be zero
    ["--device", "tpu"],            # RuntimeError from torch.device
], ids=lambda f: f[0])
def test_bad_numeric_flags_are_one_line_errors(data_root, tmp_path, capsys, flags):
    code = main(_args(data_root, tmp_path / "run", "--loss", "cosine", "--trunk", "frozen", "--epochs", "1", *flags))
    _assert_one_line_usage_error(code, capsys.readouterr().err)


def test_split_without_any_query_is_a_one_line_error(tmp_path, capsys):
    # one image per class: no test query has a relevant item; evaluation raises a bare ValueError
    root = make_folder_dataset(tmp_path / "singletons", classes=12, per_class=1)
    code = main(_args(root, tmp_path / "run", "--loss", "cosine", "--trunk", "frozen", "--epochs", "1"))
    _assert_one_line_usage_error(code, capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------
# 4. Divergence is not detected: nothing checks the (already synchronised) epoch loss, so NaN weights
#    are trained on and the run dies later with a traceback from evaluation ("embeddings must be
#    finite") or, for el_nivmf, with the misleading "temperature must be positive, got nan".


@pytest.mark.parametrize("loss", ["l2", "el_nivmf"])
def test_divergence_is_reported_in_one_line(data_root, tmp_path, capsys, loss):
    code = main(_args(data_root, tmp_path / "run", "--loss", loss, "--trunk", "frozen", "--epochs", "3",
                      "--lr", "10"))
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and ("nan" in err.lower() or "diverg" in err.lower()), err[-300:]
    assert "temperature must be positive" not in err


# ------------------------------------------------------------------------------------------------
# 5. Resume is not exact.
#    (a) train_epoch's running loss (total, count) is not checkpointed: the history.jsonl record of an
#        epoch interrupted mid-way averages only the steps after the resume.
#    (b) The checkpoint written on Ctrl-C pairs the *current* weights/optimiser state with
#        step_in_epoch = step; a Ctrl-C that lands after optimizer.step() has run (e.g. during
#        scheduler.step, or half-way through Adam's in-place update) makes the resumed run apply that
#        step a second time.


def _interrupting(original, epoch, step_index, where):
    calls = {"n": 0}

    def train_epoch(self):
        if self.epoch == epoch and self.step_in_epoch == 0 and calls["n"] == 0:
            calls["n"] += 1
            seen = {"n": 0}
            if where == "embed":
                embed = self.pipeline.embed_train

                def embed_then_stop(inputs):
                    if seen["n"] == step_index:
                        raise KeyboardInterrupt
                    seen["n"] += 1
                    return embed(inputs)

                self.pipeline.embed_train = embed_then_stop
            else:
                opt_step = self.optimizer.step

                def step_then_stop(*a, **k):
                    out = opt_step(*a, **k)
                    if seen["n"] == step_index:
                        seen["n"] += 1
                        raise KeyboardInterrupt  # Ctrl-C right after the parameter update
                    seen["n"] += 1
                    return out

                self.optimizer.step = step_then_stop
        return original(self)

    return train_epoch


def _history(run):
    return [json.loads(line)["train"]["loss"] for line in (run / "history.jsonl").read_text().splitlines()]


def test_resume_mid_epoch_keeps_the_epoch_loss_in_history(data_root, tmp_path, monkeypatch):
    extra = ["--loss", "proxy_anchor", "--trunk", "frozen", "--epochs", "2"]
    assert main(_args(data_root, tmp_path / "straight", *extra)) == 0
    original = train_module.Trainer.train_epoch
    monkeypatch.setattr(train_module.Trainer, "train_epoch", _interrupting(original, 0, 2, "embed"))
    assert main(_args(data_root, tmp_path / "broken", *extra)) == 130
    monkeypatch.setattr(train_module.Trainer, "train_epoch", original)
    assert main(["--resume", str(tmp_path / "broken")]) == 0
    assert _history(tmp_path / "broken") == pytest.approx(_history(tmp_path / "straight"), rel=1e-6)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden:UserWarning")
def test_interrupt_after_the_optimizer_step_is_not_applied_twice(data_root, tmp_path, monkeypatch):
    extra = ["--loss", "proxy_anchor", "--trunk", "frozen", "--epochs", "1"]
    assert main(_args(data_root, tmp_path / "straight", *extra)) == 0
    original = train_module.Trainer.train_epoch
    monkeypatch.setattr(train_module.Trainer, "train_epoch", _interrupting(original, 0, 1, "optimizer"))
    assert main(_args(data_root, tmp_path / "broken", *extra)) == 130
    monkeypatch.setattr(train_module.Trainer, "train_epoch", original)
    assert main(["--resume", str(tmp_path / "broken")]) == 0
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "broken" / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------
# 6. Ctrl-C before the first checkpoint (feature caching, initial test evaluation: minutes in the
#    default run) prints "resume with python -m dml.train --resume OUT", but there is no last.pt, so
#    that command then fails with "no checkpoint last.pt there".


def test_interrupt_before_first_checkpoint_gives_working_advice(data_root, tmp_path, monkeypatch, capsys):
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(FeaturePipeline, "__init__", interrupted)
    out = tmp_path / "run"
    assert main(_args(data_root, out, "--loss", "cosine", "--trunk", "frozen", "--epochs", "1")) == 130
    err = capsys.readouterr().err
    if "--resume" in err:
        assert (out / "last.pt").is_file(), f"advice {err.strip()!r} but no checkpoint to resume from"


@pytest.mark.parametrize("ending", ["success", "interrupt", "uncaught error"])
def test_main_releases_the_trainer_before_leaving_the_process_group(data_root, tmp_path, monkeypatch, ending):
    """Under DDP the trainer's DDP module holds the process group; left alive past DistContext.close, the group
    is destroyed at interpreter shutdown, where gloo's threads abort the process (seen ~1 in 20 DDP runs).
    So close() must find the trainer gone: after success, after Ctrl-C, and with an uncaught error whose
    traceback holds the trainer's frames."""
    import gc
    import weakref

    from dml.distributed import DistContext

    seen = {}

    def fit(self, has_val):
        seen["trainer"] = weakref.ref(self)
        if ending == "interrupt":
            raise KeyboardInterrupt
        if ending == "uncaught error":
            raise RuntimeError("boom")
        self._save_best()  # the final evaluation reads best.pt

    def close(self, clean=True):
        gc.collect()  # what the real close does first under DDP
        seen["alive at close"] = seen["trainer"]() is not None

    monkeypatch.setattr(train_module.Trainer, "fit", fit)
    monkeypatch.setattr(DistContext, "close", close)
    argv = _args(data_root, tmp_path / "run", "--loss", "cosine", "--trunk", "frozen", "--epochs", "1")
    if ending == "uncaught error":
        with pytest.raises(RuntimeError, match="boom"):
            main(argv)
    else:
        assert main(argv) == (0 if ending == "success" else 130)
    assert seen["alive at close"] is False


# ------------------------------------------------------------------------------------------------
# 7. Host synchronisation in every training step by default: torch.distributions' validation switch is
#    on by default (Distribution._validate_args is True), so ProxyLoss._check_labels (base.py) runs
#    `bool(labels in range .all())` and the tensor temperature check in vmf_dists.kernels runs
#    `bool(T > 0)` on every forward; the trainer never turns the switch off for its loop.


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_forward_has_no_host_sync_under_default_settings(name, monkeypatch):
    from dml.runtime import distribution_validation as _validation

    loss = build_loss(name, num_classes=4, embed_dim=8)
    emb, labels = torch.randn(8, 8, requires_grad=True), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with _validation(False):  # first use builds vmf_dists' per-order tables, once, on the host
        loss(emb, labels).backward()
    syncs = {"n": 0}
    real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item

    def counting_bool(self):
        syncs["n"] += 1
        return real_bool(self)

    def counting_item(self):
        syncs["n"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    # torch's argument validation (on by default) is a host sync by design; the trainer switches it off
    # around the training loop (dml.runtime.distribution_validation), and then a step must not synchronise.
    with _validation(False):
        loss(emb, labels).backward()
    # el_nivmf samples: its rejection sampler asks once whether every row was accepted (and, if not, where
    # the rejected rows are); the other losses are closed-form and never synchronise.
    allowed = 2 if name == "el_nivmf" else 0
    assert syncs["n"] <= allowed, f"{syncs['n']} host synchronisation(s) in one {name} forward/backward"


# ------------------------------------------------------------------------------------------------
# 8. Cars196 `images/<class dir>` layout: the "first half of the classes" is taken in lexicographic
#    order of the directory names, so numerically named class folders (1 … 196, unpadded) put classes
#    1, 10, 100 … into training and 2, 20, … partly into test — not the standard 1–98 / 99–196 split.


def test_cars196_numeric_class_dirs_split_in_numeric_order(tmp_path):
    root = tmp_path / "cars"
    for c in range(1, 11):
        d = root / "images" / str(c)
        d.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), (c * 20, i * 50, 0)).save(d / f"{i}.jpg")
    splits = load_splits("cars196", root, val_fraction=0.0)
    assert sorted(int(n) for n in splits.train.class_names) == [1, 2, 3, 4, 5]
