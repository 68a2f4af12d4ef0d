"""One final evaluation for dml.train and dml.evaluate, with one meaning of every option (issue #13,
finding 8): re-evaluating a run with its own settings reproduces its numbers exactly; 0 degradation images
means "skip" in both; results are typed and round-trip through JSON."""

from __future__ import annotations

import json

import pytest

from dml.final_eval import RetrievalMetrics, UncertaintyResult
from tests.dml.tiny_runs import make_folder_dataset, run_cli, tiny_args


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("final_eval_data"))


@pytest.mark.parametrize("trunk", ["frozen", "finetune", "partial"])
def test_evaluate_reproduces_the_training_run(data_root, tmp_path, trunk):
    out = tmp_path / "run"
    trained = run_cli("dml.train", *tiny_args(data_root, out, "--trunk", trunk, "--epochs", "1"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    before = json.loads((out / "final_metrics.json").read_text())
    report_before = (out / "report.md").read_text()
    result = run_cli("dml.evaluate", "--run", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.loads((out / "final_metrics.json").read_text())
    evaluated = final.pop("evaluate")
    assert final == before  # the training run's results are kept
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi", "map@r_euclidean"):
        assert evaluated[key] == before[key], key
    assert evaluated["uncertainty"] == before["uncertainty"]  # degradation test included: same images, same κ
    assert evaluated["uncertainty"]["degradation"]["num_images"] == evaluated["degradation_images"] > 0
    # the report keeps the training run's sections and adds the re-evaluation as one more row
    report = (out / "report.md").read_text()
    assert "re-evaluated by `dml.evaluate`" in report and "re-evaluated" not in report_before
    assert report.count("## Uncertainty") == 1


def test_zero_degradation_images_skip_the_test_in_both(data_root, tmp_path):
    out = tmp_path / "run"
    trained = run_cli("dml.train", *tiny_args(data_root, out, "--trunk", "frozen", "--epochs", "1",
                                              "--degradation-images", "0"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((out / "final_metrics.json").read_text())["uncertainty"]["degradation"] is None
    assert run_cli("dml.evaluate", "--run", out, "--device", "cpu").returncode == 0
    assert json.loads((out / "final_metrics.json").read_text())["evaluate"]["uncertainty"]["degradation"] is None
    assert run_cli("dml.evaluate", "--run", out, "--device", "cpu", "--degradation-images", "5").returncode == 0
    evaluated = json.loads((out / "final_metrics.json").read_text())["evaluate"]
    assert evaluated["uncertainty"]["degradation"]["num_images"] == 5


def test_typed_results_round_trip_and_print_rounded():
    values = {"recall@1": 0.5, "recall@2": 0.6, "recall@4": 0.7, "recall@8": 0.8, "map@r": 0.41234567,
              "r_precision": 0.4, "recall@1_euclidean": 0.45, "recall@2_euclidean": 0.5, "recall@4_euclidean": 0.6,
              "recall@8_euclidean": 0.7, "map@r_euclidean": 0.3, "r_precision_euclidean": 0.3, "num_queries": 12,
              "nmi": 0.9}
    metrics = RetrievalMetrics.from_dict(values)
    assert metrics.recall[4] == 0.7 and metrics.num_queries == 12
    assert RetrievalMetrics.from_dict(metrics.to_json()) == metrics
    assert metrics.to_json() == values
    assert "MAP@R 0.4123 " in metrics.summary() and "cross-domain" not in metrics.summary()
    crossed = {**values, "recall@1_cross_domain": 0.25, "recall@2_cross_domain": 0.5, "recall@4_cross_domain": 0.6,
               "recall@8_cross_domain": 0.7, "map@r_cross_domain": 0.2, "r_precision_cross_domain": 0.2,
               "num_queries_cross_domain": 10}
    with_cross = RetrievalMetrics.from_dict(crossed)
    assert with_cross.cross_domain is not None and with_cross.cross_domain["recall@1"] == 0.25
    assert with_cross.to_json() == crossed and RetrievalMetrics.from_dict(with_cross.to_json()) == with_cross
    assert "cross-domain R@1 0.2500  MAP@R 0.2000" in with_cross.summary()
    unc = UncertaintyResult(auroc_kappa=None, spearman_kappa_ap=-0.29946175403, mean_kappa=3.0, std_kappa=1.0,
                            mean_kappa_correct=3.0, mean_kappa_wrong=None, recall_at_1=1.0, num_queries=4,
                            num_correct=4, rejection_curve=[[0.0, 1.0]], degradation={"mean_spearman": None})
    assert UncertaintyResult.from_dict(json.loads(json.dumps(unc.to_json()))) == unc
    line = unc.summary()
    assert "AUROC(κ → 1-NN correct) n/a" in line and "-0.2995" in line and "None" not in line
