"""dml.train end to end on a tiny generated dataset with the tiny backbone: a 1-epoch run writes every
file, resume equals uninterrupted (at an epoch boundary and mid-epoch), configs and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dml import trainer as train_module
from dml.checkpoint import load_checkpoint, seed_everything
from dml.config import ConfigError, parse_config
from dml.models import build_model
from dml.train import main
from tests.dml.tiny_runs import make_folder_dataset, signal_after_first_epoch
from tests.dml.tiny_runs import tiny_args as _args


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("tinydata"))


@pytest.mark.parametrize("loss,trunk", [("el_nivmf", "finetune"), ("proxy_anchor", "frozen"), ("el_nivmf", "partial")])
def test_one_epoch_run_writes_every_file(data_root, tmp_path, loss, trunk, capsys):
    out = tmp_path / "run"
    code = main(_args(data_root, out, "--loss", loss, "--trunk", trunk, "--epochs", "1", "--feature-views", "2"))
    assert code == 0, capsys.readouterr().err
    for name in ("config.json", "history.jsonl", "last.pt", "best.pt", "initial_metrics.json", "final_metrics.json",
                 "report.md"):
        assert (out / name).is_file(), name
    final = json.loads((out / "final_metrics.json").read_text())
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi", "recall@1_initial"):
        assert 0.0 <= final[key] <= 1.0, key
    assert final["trunk"] == trunk and final["selected_epoch"] == 1
    if loss == "el_nivmf":  # κ is a concentration: the uncertainty metrics and the degradation test run
        assert set(final["uncertainty"]) >= {"auroc_kappa", "spearman_kappa_ap", "rejection_curve", "degradation"}
        assert (out / "report" / "kappa_histogram.png").is_file()
    else:
        assert final["uncertainty"] is None
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == loss and config["epochs"] == 1
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and np.isfinite(history[0]["train"]["loss"])
    if trunk != "finetune":
        assert trunk.upper() in capsys.readouterr().out
    if trunk == "partial":  # the prefix stays as it was, the suffix trained
        seed_everything(3)  # as the run did (tiny_args: seed 3) before building its model
        initial = build_model("tiny", 16, weights=None, partial_trunk=True).state_dict()
        trained = load_checkpoint(out / "best.pt")["model"]
        assert torch.equal(trained["trunk.body.0.weight"], initial["trunk.body.0.weight"])
        assert not torch.equal(trained["trunk.body.9.weight"], initial["trunk.body.9.weight"])


def _weights(path):
    state = load_checkpoint(path)
    return state["model"], state["loss"], state["optimizer"]["state"]


def _assert_same_state(a, b):
    for part_a, part_b in zip(_weights(a), _weights(b)):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            va, vb = part_a[key], part_b[key]
            if isinstance(va, dict):
                for k in va:
                    assert torch.equal(torch.as_tensor(va[k]), torch.as_tensor(vb[k])), (key, k)
            else:
                assert torch.equal(va, vb), key


@pytest.mark.parametrize("interrupt_at, trunk", [((1, 0), "finetune"), ((0, 2), "finetune"), ((0, 2), "partial")],
                         ids=["after-epoch-1", "mid-epoch", "mid-epoch-partial"])
def test_resume_equals_uninterrupted(data_root, tmp_path, monkeypatch, interrupt_at, trunk):
    """A Ctrl-C (a real SIGINT to this process) during the step before ``interrupt_at`` = (epoch, step):
    the step completes, last.pt is written at the boundary, and --resume ends with the same weights,
    optimizer state, history and metrics as the uninterrupted run."""
    import os
    import signal

    extra = ["--loss", "el_nivmf", "--trunk", trunk, "--epochs", "2"]
    assert main(_args(data_root, tmp_path / "straight", *extra)) == 0

    original = train_module.Trainer.train_epoch
    fired = {"done": False}

    def interrupted_epoch(self):
        embed = self.pipeline.embed_train
        target_epoch, target_step = interrupt_at
        if target_step == 0:  # "after epoch 1": the signal arrives during the last step of the epoch before
            target_epoch, target_step = target_epoch - 1, self.steps_per_epoch
        if self.epoch == target_epoch and not fired["done"]:
            steps = {"n": self.step_in_epoch}

            def embed_then_signal(inputs):
                steps["n"] += 1
                if steps["n"] == target_step:
                    fired["done"] = True
                    os.kill(os.getpid(), signal.SIGINT)
                return embed(inputs)

            self.pipeline.embed_train = embed_then_signal
        return original(self)

    monkeypatch.setattr(train_module.Trainer, "train_epoch", interrupted_epoch)
    broken = tmp_path / "broken"
    assert main(_args(data_root, broken, *extra)) == 130
    monkeypatch.setattr(train_module.Trainer, "train_epoch", original)
    state = load_checkpoint(broken / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == interrupt_at
    assert main(["--resume", str(broken)]) == 0
    _assert_same_state(tmp_path / "straight" / "last.pt", broken / "last.pt")
    history_a = (tmp_path / "straight" / "history.jsonl").read_text().splitlines()
    history_b = (broken / "history.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in history_a]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in history_b]
    final_a = json.loads((tmp_path / "straight" / "final_metrics.json").read_text())
    final_b = json.loads((broken / "final_metrics.json").read_text())
    assert final_a["recall@1"] == final_b["recall@1"] and final_a["map@r"] == final_b["map@r"]


def test_config_file_and_flags(tmp_path, data_root):
    cfg = tmp_path / "c.toml"
    cfg.write_text('loss = "proxy_nca"\nembed_dim = 32\n[loss_options]\ntemperature = 0.2\n')
    config = parse_config(["--config", str(cfg), "--embed-dim", "24", "--loss-option", "proxy_lr_mult=5"])
    assert config.loss == "proxy_nca" and config.embed_dim == 24
    assert config.loss_options == {"temperature": 0.2, "proxy_lr_mult": 5}
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("epochs: 3\nfreeze_batchnorm: false\n")
    config = parse_config(["--config", str(yaml_cfg)])
    assert config.epochs == 3 and config.freeze_batchnorm is False
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_config(["--loss-option", "oops"])


def test_saved_config_reruns(tmp_path, data_root):
    out = tmp_path / "a"
    assert main(_args(data_root, out, "--loss", "norm_softmax", "--trunk", "frozen", "--epochs", "1",
                      "--feature-views", "1")) == 0
    config = parse_config(["--config", str(out / "config.json"), "--output-dir", str(tmp_path / "b")])
    assert config.loss == "norm_softmax" and config.embed_dim == 16 and config.trunk == "frozen"


@pytest.mark.parametrize("argv,needle", [
    (["--dataset", "folder", "--data-root", "/nonexistent/place"], "/nonexistent/place"),
    (["--dataset", "imagenet"], "imagenet"),
    (["--loss", "triplet", "--dataset", "folder"], "triplet"),
    (["--resume", "/nonexistent/run"], "/nonexistent/run"),
])
def test_usage_errors_are_one_line(argv, needle, tmp_path, capsys, data_root):
    if "--data-root" not in argv and "--resume" not in argv:
        argv = argv + ["--data-root", str(data_root)]
    if "--resume" not in argv:
        argv = ["--output-dir", str(tmp_path / "x"), "--backbone", "tiny", "--weights", "none", "--device", "cpu",
                *argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # a bad choice is argparse's: one line, status 2
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err


def test_refuses_to_overwrite_a_run(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    args = _args(data_root, out, "--loss", "cosine", "--trunk", "frozen", "--epochs", "1", "--feature-views", "1")
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_takes_no_other_flags_than_epochs(tmp_path):
    from dml.config import parse_request

    with pytest.raises(ConfigError, match="--resume continues a run .*--lr"):
        parse_request(["--resume", str(tmp_path), "--epochs", "3", "--lr", "0.1"])
    assert parse_request(["--resume", str(tmp_path), "--epochs", "3"]).overrides == {"epochs": 3}


def test_run_directory_lock(tmp_path):
    from dml.runtime import run_lock

    with run_lock(tmp_path):
        with pytest.raises(ConfigError, match="in use by another dml process"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released
        pass
    assert not (tmp_path / ".lock").exists()  # and removed


def test_real_sigint_leaves_a_resumable_checkpoint(data_root, tmp_path):
    """A real SIGINT (Ctrl-C) to a running `python -m dml.train`: exit 130, then --resume finishes the run."""
    import signal

    out = tmp_path / "run"
    args = _args(data_root, out, "--loss", "proxy_anchor", "--trunk", "finetune", "--epochs", "1000")
    status, err = signal_after_first_epoch(args, out, signal.SIGINT)
    assert status == 130, err
    assert "--resume" in err
    state = load_checkpoint(out / "last.pt")
    assert 1 <= state["epoch"] < 1000


def test_feature_cache_is_reused_and_gives_the_same_run(data_root, tmp_path, capsys):
    cache = tmp_path / "features"
    common = ["--loss", "norm_softmax", "--trunk", "frozen", "--epochs", "1", "--feature-cache", str(cache)]
    assert main(_args(data_root, tmp_path / "a", *common)) == 0
    assert "saved the features" in capsys.readouterr().out
    assert len(list(cache.glob("*.pt"))) == 1
    assert main(_args(data_root, tmp_path / "b", *common)) == 0
    assert "loading cached frozen-trunk features" in capsys.readouterr().out
    a = json.loads((tmp_path / "a" / "final_metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "final_metrics.json").read_text())
    assert a["recall@1"] == b["recall@1"] and a["map@r"] == b["map@r"]
    # another resolution is another cache entry
    assert main(_args(data_root, tmp_path / "c", *common, "--resolution", "24")) == 0
    assert len(list(cache.glob("*.pt"))) == 2


def test_gpu_path_options_run_on_cpu(data_root, tmp_path):
    """bf16 autocast, channels-last and the on-device image bank with batched crops (the CUDA defaults) also
    work on a CPU; the run is finite and evaluates the same embeddings as the bank's centre crops."""
    out = tmp_path / "run"
    code = main(_args(data_root, out, "--loss", "el_vmf", "--trunk", "finetune", "--epochs", "1", "--amp", "bf16",
                      "--channels-last", "on", "--device-augment", "on"))
    assert code == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert 0.0 <= final["recall@1"] <= 1.0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert np.isfinite(history[0]["train"]["loss"])
    from dml.config import config_from_dict

    with pytest.raises(ConfigError, match="--amp must be one of"):
        config_from_dict({"amp": "fp8"})
