"""The command lines as a user meets them (issue #13): every entry point's --help and one bad flag, one-line
errors with exit status 2 (usage) or 1 (runtime), values never silently "fixed", SIGTERM handled like
Ctrl-C, and a console that reads well in a redirected log. Each test runs the real command in a
subprocess (tiny backbone, generated data, CPU)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal

import pytest

from dml.checkpoint import load_checkpoint
from tests.dml.tiny_runs import assert_one_line_error, make_folder_dataset, run_cli, signal_after_first_epoch, tiny_args

ENTRY_POINTS = ("dml.train", "dml.evaluate")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("cli_data"))


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory):
    """A finished one-epoch frozen-trunk el_nivmf run (uncertainty and report included)."""
    out = tmp_path_factory.mktemp("cli_runs") / "run"
    result = run_cli("dml.train", *tiny_args(data_root, out, "--trunk", "frozen", "--epochs", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


# ------------------------------------------------------------------------------------------------
# finding 1: --help crashed (argparse read "40% of" as a format); 29 lines of usage for one bad flag


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_works(module):
    result = run_cli(module, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and result.stderr == ""
    if module == "dml.train":
        assert "--device-augment" in result.stdout and "40 percent" in result.stdout


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_unknown_flag_is_one_line(module):
    required = ["--run", "somewhere"] if module == "dml.evaluate" else []
    assert_one_line_error(run_cli(module, *required, "--no-such-flag"), 2, "unrecognized arguments: --no-such-flag")


# ------------------------------------------------------------------------------------------------
# findings 4 and 5: tracebacks, and bad numbers silently "fixed"


@pytest.mark.parametrize("toml,needle", [
    ("epochs = [1, 2]", "epochs must be an integer"),
    ('loss_options = "x"', "loss_options must be a table"),
    ("epochs = 1.9", "epochs must be an integer, got 1.9"),
    ("embed_dim = true", "embed_dim must be an integer, got True"),
], ids=["list", "options-string", "float-epochs", "bool-dim"])
def test_wrong_types_in_a_config_file_are_refused(tmp_path, toml, needle):
    path = tmp_path / "run.toml"
    path.write_text(toml + "\n")
    assert_one_line_error(run_cli("dml.train", "--config", path, "--output-dir", tmp_path / "out"), 2, needle)
    assert not (tmp_path / "out").exists()


def test_negative_epochs_are_refused(tmp_path):
    assert_one_line_error(run_cli("dml.train", "--epochs", "-1", "--output-dir", tmp_path / "out"), 2,
                          "--epochs must be an integer >= 0")


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    assert_one_line_error(run_cli("dml.train", "--output-dir", path), 2, "is a file")


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_unreadable_checkpoint_is_a_one_line_runtime_failure(finished_run, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    assert_one_line_error(run_cli("dml.train", "--resume", run), 1, "cannot read checkpoint")
    assert_one_line_error(run_cli("dml.evaluate", "--run", run, "--checkpoint", "last", "--device", "cpu"), 1,
                          "cannot load checkpoint")


@pytest.mark.parametrize("code,hint", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_full_or_read_only_disk_is_a_one_line_runtime_failure(data_root, tmp_path, monkeypatch, capsys, code, hint):
    """OSError 28 / 30 while a checkpoint is written: one line, exit 1, and no half-written file left."""
    from dml import checkpoint
    from dml.train import main

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)
    out = tmp_path / "run"
    assert main(tiny_args(data_root, out, "--trunk", "frozen", "--epochs", "1")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and hint in err, err
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()


# ------------------------------------------------------------------------------------------------
# finding 6: SIGTERM (what schedulers send) exited 143 silently and lost the epoch


def test_sigterm_behaves_like_ctrl_c(data_root, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(data_root, out, "--loss", "proxy_anchor", "--trunk", "frozen", "--epochs", "100000")
    status, err = signal_after_first_epoch(args, out, signal.SIGTERM)
    assert status == 143, err
    assert "interrupted (SIGTERM): resume with" in err and f"--resume {out}" in err and "Traceback" not in err
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] >= 1
    assert not (out / ".lock").exists()
    # the saved run continues (extended to one more epoch than it had)
    result = run_cli("dml.train", "--resume", out, "--epochs", state["epoch"] + 1)
    assert result.returncode == 0, result.stderr[-1000:]


# ------------------------------------------------------------------------------------------------
# finding 9: the console


def test_console_of_a_redirected_run(data_root, tmp_path, finished_run):
    """No progress-bar carriage returns in a redirected log, numbers rounded, no matplotlib glyph warnings
    for emoji class names, no .lock left behind."""
    _, result = finished_run
    for stream in (result.stdout, result.stderr):
        assert "\r" not in stream
        assert not re.search(r"\d\.\d{5,}", stream), stream  # no unrounded floats
        assert "None" not in stream
    names = [f"\N{MELTING FACE} melting {c}" if c % 2 else f"\N{FLAMINGO} bird {c}" for c in range(16)]
    emoji_data = make_folder_dataset(tmp_path / "emoji_names", names=names)
    out = tmp_path / "run"
    emoji = run_cli("dml.train", *tiny_args(emoji_data, out, "--trunk", "frozen", "--epochs", "1"))
    assert emoji.returncode == 0, emoji.stderr[-2000:]
    assert "Glyph" not in emoji.stderr and "Warning" not in emoji.stderr, emoji.stderr
    assert (out / "report" / "confident_images.png").is_file()
    assert not (out / ".lock").exists()


def test_batch_larger_than_the_training_set_is_refused(data_root, tmp_path):
    result = run_cli("dml.train", *tiny_args(data_root, tmp_path / "run", "--batch-size", "1000"))
    assert_one_line_error(result, 2, "--batch-size 1000 is larger than the 24 training images")


def test_weights_none_on_cpu_fine_tunes(data_root, tmp_path):
    """--weights none with the automatic trunk mode would train a head on a frozen random network."""
    from dml.train import main

    out = tmp_path / "run"
    args = tiny_args(data_root, out, "--epochs", "1", "--loss", "cosine")
    assert "--trunk" not in args and "none" in args
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["trunk"] == "finetune"


def test_weights_error_never_advises_unsafe_loading(tmp_path):
    import argparse

    import torch

    path = tmp_path / "objects.pt"
    torch.save({"model": argparse.Namespace(a=1)}, path)
    result = run_cli("dml.train", "--weights", path, "--output-dir", tmp_path / "out", "--device", "cpu")
    assert_one_line_error(result, 2, "holds Python objects besides tensors")
    assert "weights_only" not in result.stderr
