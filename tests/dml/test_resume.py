"""--resume refuses data or configuration that changed since the run started, in one line saying what
changed, and --resume DIR --epochs N extends a run (issue #13, findings 3 and 7). Real commands in
subprocesses; tiny backbone, generated data, CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dml.checkpoint import load_checkpoint
from tests.dml.tiny_runs import assert_one_line_error, make_folder_dataset, run_cli, tiny_args


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Generated data and a one-epoch frozen-trunk run on it (the template every test copies)."""
    base = tmp_path_factory.mktemp("resume")
    data = make_folder_dataset(base / "data")
    result = run_cli("dml.train", *tiny_args(data, base / "run", "--trunk", "frozen", "--epochs", "1",
                                             "--loss", "norm_softmax"))
    assert result.returncode == 0, result.stderr[-2000:]
    return base


def _copy(started, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(started / "data", data)
    shutil.copytree(started / "run", run)
    config = json.loads((run / "config.json").read_text())
    config["data_root"] = str(data)  # the copy's own data: its fingerprint matches (paths are relative)
    (run / "config.json").write_text(json.dumps(config))
    state = load_checkpoint(run / "last.pt")
    state["config"]["data_root"] = str(data)
    torch.save(state, run / "last.pt")
    return data, run


def test_unchanged_data_moved_elsewhere_resumes(started, tmp_path):
    _, run = _copy(started, tmp_path)
    result = run_cli("dml.train", "--resume", run, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-1000:]


def test_replaced_classes_and_a_cut_class_are_refused(started, tmp_path):
    """The issue's case: two class folders replaced and one class cut to a single image; the resumed run
    used to finish with exit 0 on a different test split."""
    data, run = _copy(started, tmp_path)
    for name in ("class_00", "class_01"):
        (data / name).rename(data / f"new_{name}")
    kept = sorted((data / "class_05").iterdir())
    for path in kept[1:]:
        path.unlink()
    result = run_cli("dml.train", "--resume", run, "--epochs", "2")
    assert_one_line_error(result, 2, "the data changed since the run started")
    assert "classes removed" in result.stderr and "fewer" in result.stderr


def test_more_training_classes_are_refused_not_a_traceback(started, tmp_path):
    """A changed number of training classes used to end in 'size mismatch for proxies'."""
    data, run = _copy(started, tmp_path)
    make_folder_dataset(data / "extra", classes=4)
    for folder in (data / "extra").iterdir():
        folder.rename(data / f"extra_{folder.name}")
    result = run_cli("dml.train", "--resume", run)
    assert_one_line_error(result, 2, "the data changed")
    assert "size mismatch" not in result.stderr


def test_a_resized_image_is_refused(started, tmp_path):
    data, run = _copy(started, tmp_path)
    image = sorted((data / "class_03").iterdir())[0]
    image.write_bytes(image.read_bytes() + b"\0" * 10)
    assert_one_line_error(run_cli("dml.train", "--resume", run), 2, "1 files of another size")


def test_edited_config_json_is_refused(started, tmp_path):
    """Edits to config.json used to be ignored silently."""
    _, run = _copy(started, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("dml.train", "--resume", run), 2, "was edited since the run started (lr: ")


def test_resume_takes_only_epochs_and_never_fewer_than_trained(started, tmp_path):
    _, run = _copy(started, tmp_path)
    assert_one_line_error(run_cli("dml.train", "--resume", run, "--epochs", "1", "--lr", "1"), 2,
                          "only --epochs may be given")
    extended = run_cli("dml.train", "--resume", run, "--epochs", "2")
    assert extended.returncode == 0, extended.stderr[-1000:]
    assert_one_line_error(run_cli("dml.train", "--resume", run, "--epochs", "1"), 2, "has already trained 2 epochs")


def test_extending_a_run_equals_training_longer_from_the_start(tmp_path):
    """--resume DIR --epochs N trains a finished run on. With a constant schedule (no warm-up) the
    extended run is exactly the run that was asked for N epochs from the start; the history has N epochs."""
    data = make_folder_dataset(tmp_path / "data")
    common = ("--trunk", "frozen", "--loss", "proxy_nca", "--scheduler", "constant", "--warmup-epochs", "0")
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    assert run_cli("dml.train", *tiny_args(data, straight, *common, "--epochs", "3")).returncode == 0
    assert run_cli("dml.train", *tiny_args(data, extended, *common, "--epochs", "1")).returncode == 0
    result = run_cli("dml.train", "--resume", extended, "--epochs", "3")
    assert result.returncode == 0, result.stderr[-1000:]
    assert "extending the run from 1 to 3 epochs" in result.stdout
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(extended / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert b["epoch"] == 3 and len((extended / "history.jsonl").read_text().splitlines()) == 3
    assert json.loads((extended / "config.json").read_text())["epochs"] == 3
    final = json.loads((extended / "final_metrics.json").read_text())
    assert final["recall@1"] == json.loads((straight / "final_metrics.json").read_text())["recall@1"]
