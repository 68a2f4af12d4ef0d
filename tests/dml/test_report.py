"""dml.report on a tiny fake run (with and without validation / uncertainty), and ``python -m dml.evaluate``
end to end on tiny runs trained by dml.train, with its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dml import evaluate as evaluate_module
from dml.data import Split
from dml.final_eval import UncertaintyResult
from dml.report import PLOT_NAMES, ReportInputs, metric_rows, write_report
from dml.train import main as train_main
from dml.uncertainty import degradation_test, per_query_uncertainty, uncertainty_metrics
from tests.dml.tiny_runs import make_folder_dataset
from tests.dml.tiny_runs import tiny_args as _args

KAPPA_PLOTS = ("kappa_histogram.png", "rejection_curve.png", "kappa_vs_degradation.png", "degradation_examples.png",
               "confident_images.png")


def _assert_png(path):
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 300 and im.height >= 200


# --------------------------------------------------------------------------------------------------
# write_report on a fake run


@pytest.fixture()
def fake_run(tmp_path):
    """A test split of 6 classes × 3 tiny images, embeddings whose norm grows with class index, and the
    uncertainty results computed from them."""
    rng = np.random.default_rng(1)
    paths, labels = [], []
    for c in range(6):
        for i in range(3):
            p = tmp_path / "images" / f"c{c}_{i}.png"
            p.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 20, 3)).astype(np.uint8)).save(p)
            paths.append(str(p))
            labels.append(c)
    split = Split(tuple(paths), tuple(labels), tuple(f"class {c}" for c in range(6)))
    g = torch.Generator().manual_seed(0)
    y = torch.tensor(labels)
    x = torch.randn(6, 8, generator=g)[y] + 0.8 * torch.randn(18, 8, generator=g)
    x = x * (1 + y[:, None].float())
    uncertainty = uncertainty_metrics(x, y)
    images = torch.rand(4, 3, 32, 32, generator=g)
    uncertainty["degradation"] = degradation_test(lambda t: t.flatten(1)[:, :8] * (1 - t.var(dim=(1, 2, 3)))[:, None],
                                                  images, batch_size=2)
    history = [{"epoch": e, "train": {"loss": 3.0 - 0.5 * e, "mean_image_kappa": 40.0 - e},
                "val": {"recall@1": 0.3 + 0.1 * e, "map@r": 0.2 + 0.05 * e}, "seconds": 0.1} for e in (1, 2, 3)]
    metrics = {"recall@1": 0.5, "recall@2": 0.6, "recall@4": 0.7, "recall@8": 0.8, "map@r": 0.4, "nmi": 0.9,
               "r_precision": 0.4, "recall@1_euclidean": 0.45}
    final = {**metrics, "selected_epoch": 2, "selection": "best validation recall@1",
             "last_epoch": {**metrics, "recall@1": 0.48}, "initial": {**metrics, "recall@1": 0.2}, "device": "cpu"}
    return {"dir": tmp_path / "run", "split": split, "details": per_query_uncertainty(x, y), "uncertainty": uncertainty,
            "history": history, "final": final}


def _report(out, *, history, final_metrics, uncertainty, test_split, per_query, resolution, config=None):
    """write_report from the pieces a run has (final_metrics.json as a dict, uncertainty as its JSON)."""
    return write_report(out, ReportInputs(
        rows=metric_rows(final_metrics, history), history=history, selected_epoch=final_metrics.get("selected_epoch"),
        uncertainty=None if uncertainty is None else UncertaintyResult.from_dict(uncertainty), details=per_query,
        test_split=test_split, resolution=resolution, config=config, device=final_metrics.get("device")))


def test_write_report_full(fake_run):
    out = fake_run["dir"]
    path = _report(out, history=fake_run["history"], final_metrics=fake_run["final"],
                        uncertainty=fake_run["uncertainty"], test_split=fake_run["split"],
                        per_query=fake_run["details"], resolution=32,
                        config={"dataset": "folder", "loss": "el_nivmf", "backbone": "tiny"})
    assert path == out / "report.md"
    text = path.read_text()
    for name in PLOT_NAMES:
        _assert_png(out / "report" / name)
        assert f"(report/{name})" in text
    for heading in ("## Test metrics", "## Training", "## Uncertainty", "### Accuracy–rejection curve",
                    "### Degradation test", "### Most and least confident test images"):
        assert heading in text
    assert "selected checkpoint (epoch 2; best validation recall@1)" in text
    assert "| before training | 0.2000 |" in text and "last epoch (3)" in text
    assert f"{fake_run['uncertainty']['auroc_kappa']:.4f}" in text
    assert "loss `el_nivmf`" in text


def test_write_report_without_validation_or_uncertainty(fake_run):
    out = fake_run["dir"]
    # first a full report, then one without uncertainty in the same directory: stale κ figures go away
    _report(out, history=fake_run["history"], final_metrics=fake_run["final"],
                 uncertainty=fake_run["uncertainty"], test_split=fake_run["split"], per_query=fake_run["details"],
                 resolution=32)
    history = [{k: v for k, v in r.items() if k != "val"} for r in fake_run["history"]]
    final = {**fake_run["final"], "selection": "last epoch (no validation split)", "selected_epoch": 3}
    path = _report(out, history=history, final_metrics=final, uncertainty=None, test_split=fake_run["split"],
                        per_query=None, resolution=32, config={"loss": "proxy_anchor"})
    text = path.read_text()
    _assert_png(out / "report" / "training_curves.png")
    for name in KAPPA_PLOTS:
        assert not (out / "report" / name).exists(), name
        assert name not in text
    assert "No validation split" in text
    assert "Not evaluated: `proxy_anchor` does not model the embedding norm" in text
    # and with nothing at all: no crash
    bare = _report(out / "bare", history=[], final_metrics={}, uncertainty=None, test_split=None,
                        per_query=None, resolution=32)
    assert "No test metrics recorded yet" in bare.read_text()


def test_write_report_uncertainty_without_per_query(fake_run):
    out = fake_run["dir"]
    text = _report(out, history=fake_run["history"], final_metrics=fake_run["final"],
                        uncertainty=fake_run["uncertainty"], test_split=fake_run["split"], per_query=None,
                        resolution=32).read_text()
    for name in ("rejection_curve.png", "kappa_vs_degradation.png", "degradation_examples.png"):
        _assert_png(out / "report" / name)
    assert not (out / "report" / "kappa_histogram.png").exists()
    assert not (out / "report" / "confident_images.png").exists()
    assert "No per-query values given" in text


# --------------------------------------------------------------------------------------------------
# python -m dml.evaluate


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("evaldata"))


@pytest.fixture(scope="module")
def vmf_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vmf"
    assert train_main(_args(data_root, out, "--loss", "el_nivmf", "--trunk", "finetune", "--epochs", "2")) == 0
    return out


def test_evaluate_end_to_end(vmf_run, capsys):
    before = json.loads((vmf_run / "final_metrics.json").read_text())
    code = evaluate_module.main(["--run", str(vmf_run), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "AUROC" in captured.out
    final = json.loads((vmf_run / "final_metrics.json").read_text())
    for key, value in before.items():  # the trainer's results are kept
        assert final[key] == value, key
    ev = final["evaluate"]
    assert ev["checkpoint"] == "best" and ev["epoch"] == before["selected_epoch"]
    # the same checkpoint, the same images and transform: the trainer's test metrics again
    for key in ("recall@1", "recall@4", "map@r", "r_precision"):
        assert ev[key] == pytest.approx(before[key], abs=1e-6), key
    unc = ev["uncertainty"]
    assert unc == before["uncertainty"]  # one evaluation, one meaning of every option: the same numbers
    assert unc["num_queries"] == before["num_queries"]
    assert len(unc["rejection_curve"]) == 10
    text = (vmf_run / "report.md").read_text()
    assert "re-evaluated by `dml.evaluate`" in text and "### Degradation test" in text
    for name in PLOT_NAMES:
        _assert_png(vmf_run / "report" / name)
    # the last checkpoint, no report
    assert evaluate_module.main(["--run", str(vmf_run), "--checkpoint", "last", "--device", "cpu",
                                 "--degradation-images", "0", "--no-report"]) == 0
    ev = json.loads((vmf_run / "final_metrics.json").read_text())["evaluate"]
    assert ev["checkpoint"] == "last" and ev["epoch"] == 2 and ev["uncertainty"]["degradation"] is None
    for key in ("recall@1", "map@r"):
        assert ev[key] == pytest.approx(before["last_epoch"][key], abs=1e-6)


def test_evaluate_non_vmf_loss_skips_uncertainty(data_root, tmp_path, capsys):
    out = tmp_path / "pa"
    assert train_main(_args(data_root, out, "--loss", "proxy_anchor", "--trunk", "frozen", "--epochs", "1",
                            "--val-fraction", "0")) == 0
    assert evaluate_module.main(["--run", str(out), "--device", "cpu"]) == 0
    assert "uncertainty: skipped" in capsys.readouterr().out
    ev = json.loads((out / "final_metrics.json").read_text())["evaluate"]
    assert ev["uncertainty"] is None
    text = (out / "report.md").read_text()
    assert "Not evaluated: `proxy_anchor`" in text and "No validation split" in text
    assert not (out / "report" / "kappa_histogram.png").exists()


def test_evaluate_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert evaluate_module.main(["--run", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such run directory" in err and err.count("\n") == 1
    run = tmp_path / "half"
    run.mkdir()
    assert evaluate_module.main(["--run", str(run)]) == 2
    assert "no config.json" in capsys.readouterr().err
    (run / "config.json").write_text(json.dumps({"dataset": "folder", "data_root": str(tmp_path), "backbone": "tiny"}))
    assert evaluate_module.main(["--run", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint best.pt" in err and err.count("\n") == 1
    (run / "config.json").write_text(json.dumps({"no_such_key": 1}))
    assert evaluate_module.main(["--run", str(run), "--device", "cpu"]) == 2
    assert "unknown config key" in capsys.readouterr().err
