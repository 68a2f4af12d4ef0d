"""benchmarks/compare_losses.py on a tiny generated dataset: 2 losses × 2 seeds of 1 epoch, one shared
feature cache computed once, the table equals mean ± std recomputed from the runs' final_metrics.json,
a second invocation skips the finished runs (and resumes an interrupted one), --write-docs edits only the
marked section."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from tests.dml.tiny_runs import make_folder_dataset

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_losses.py"
LOSSES = ("el_nivmf", "proxy_anchor")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_losses", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(data_root, out, docs):
    return ["--losses", *LOSSES, "--seeds", *map(str, SEEDS), "--dataset", "folder", "--data-root", str(data_root),
            "--output-dir", str(out), "--epochs", "1", "--write-docs", "--docs", str(docs), "--trunk", "frozen",
            # passed on to dml.train
            "--backbone", "tiny", "--weights", "none", "--embed-dim", "16", "--batch-size", "8",
            "--eval-batch-size", "16", "--val-fraction", "0.25", "--device", "cpu"]


def _expected(out, loss, key):
    values = []
    for seed in SEEDS:
        final = json.loads((out / loss / f"seed{seed}" / "final_metrics.json").read_text())
        if key == "auroc_kappa":
            value = (final["uncertainty"] or {}).get("auroc_kappa")
        elif key == "degradation_spearman":
            value = ((final["uncertainty"] or {}).get("degradation") or {}).get("mean_spearman")
        else:
            value = final.get(key)  # no cross-domain metrics on folder data: its images have no domains
        if value is not None:
            values.append(float(value))
    return values


def test_compare_losses_end_to_end(compare, tmp_path, capsys):
    data_root = make_folder_dataset(tmp_path / "data")
    out = tmp_path / "compare"
    docs = tmp_path / "results.md"
    docs.write_text(f"# Results\n\nintro\n\n{compare.BEGIN}\nold table\n{compare.END}\n\n## Other\n\nkept\n")

    assert compare.main(_argv(data_root, out, docs)) == 0
    printed = capsys.readouterr().out
    # one shared cache: the first run computes the trunk features, the other three load them
    assert printed.count("caching frozen-trunk features") == 1
    assert printed.count("loading cached frozen-trunk features") == len(LOSSES) * len(SEEDS) - 1
    assert len(list((out / "features").glob("*.pt"))) == 1
    for loss in LOSSES:
        for seed in SEEDS:
            assert (out / loss / f"seed{seed}" / "final_metrics.json").is_file()
            assert json.loads((out / loss / f"seed{seed}" / "config.json").read_text())["seed"] == seed

    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    for loss in LOSSES:
        metrics = results["losses"][loss]["metrics"]
        for key, _ in compare.METRICS:
            values = _expected(out, loss, key)
            if key in ("auroc_kappa", "degradation_spearman") and loss == "proxy_anchor" or key.endswith("_domain"):
                assert values == [] and metrics[key]["mean"] is None  # no uncertainty / no domains here
                continue
            assert len(values) == len(SEEDS), (loss, key)
            assert metrics[key]["values"] == values
            assert metrics[key]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert metrics[key]["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        row = next(line for line in table.splitlines() if line.startswith(f"| `{loss}` | 0, 1 |"))
        r1 = _expected(out, loss, "recall@1")
        assert f"{statistics.fmean(r1):.3f} ± {statistics.stdev(r1):.3f}" in row
        if loss == "proxy_anchor":
            assert row.rstrip().endswith("| — | — |")
    # the uncertainty table: the accuracy–rejection points and per-corruption ρ, for the vMF loss only
    finals = [json.loads((out / "el_nivmf" / f"seed{s}" / "final_metrics.json").read_text()) for s in SEEDS]
    at_half = [dict(map(tuple, f["uncertainty"]["rejection_curve"]))[0.5] for f in finals]
    occlude = [f["uncertainty"]["degradation"]["kinds"]["occlude"]["spearman"] for f in finals]
    assert results["losses"]["el_nivmf"]["metrics"]["rejection@0.5"]["values"] == at_half
    assert results["losses"]["el_nivmf"]["metrics"]["spearman_occlude"]["values"] == occlude
    assert results["losses"]["proxy_anchor"]["metrics"]["rejection@0.5"]["mean"] is None
    row = next(line for line in table.splitlines() if line.startswith("| `el_nivmf` | 0.")
               and "rejected" not in line)
    cells = row.split(" | ")
    assert cells[3] == f"{statistics.fmean(at_half):.3f} ± {statistics.stdev(at_half):.3f}"
    assert cells[-1].rstrip(" |") == f"{statistics.fmean(occlude):.3f} ± {statistics.stdev(occlude):.3f}"
    assert not any(line.startswith("| `proxy_anchor` | 0.") for line in table.splitlines())
    text = docs.read_text()
    assert text.startswith("# Results\n\nintro\n\n") and text.endswith("\n\n## Other\n\nkept\n")
    assert "old table" not in text and compare.format_table(results) in text

    # again: every run is skipped, nothing is retrained, the features are not recomputed
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/final_metrics.json")}
    assert compare.main(_argv(data_root, out, docs)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before, skipped") == len(LOSSES) * len(SEEDS)
    assert "caching frozen-trunk features" not in printed and ": training" not in printed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "results.json").read_text())["losses"] == results["losses"]

    # an interrupted run (last.pt, no final_metrics.json) is resumed, not restarted
    (out / "proxy_anchor" / "seed1" / "final_metrics.json").unlink()
    assert compare.main(_argv(data_root, out, docs)) == 0
    printed = capsys.readouterr().out
    assert "proxy_anchor/seed1: interrupted before, resuming" in printed
    assert printed.count("finished before, skipped") == len(LOSSES) * len(SEEDS) - 1
    assert (out / "proxy_anchor" / "seed1" / "final_metrics.json").is_file()


def test_loss_variants_get_their_options_and_directories(compare, tmp_path):
    """An ablation ``LOSS:KEY=VALUE,…`` trains LOSS with those --loss-option flags in its own directory."""
    assert compare.parse_variant("el_nivmf") == ("el_nivmf", [])
    assert compare.parse_variant("el_nivmf:guidance_weight=0,temperature_lr_mult=0") == (
        "el_nivmf", ["--loss-option", "guidance_weight=0", "--loss-option", "temperature_lr_mult=0"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        compare.parse_variant("el_nivmf:guidance_weight")
    data_root = make_folder_dataset(tmp_path / "data")
    out = tmp_path / "compare"
    variant = "el_nivmf:guidance_weight=0"
    argv = ["--losses", variant, "--seeds", "0", "--dataset", "folder", "--data-root", str(data_root),
            "--output-dir", str(out), "--epochs", "1", "--trunk", "frozen", "--backbone", "tiny", "--weights", "none",
            "--embed-dim", "16", "--batch-size", "8", "--eval-batch-size", "16", "--val-fraction", "0.25",
            "--device", "cpu", "--degradation-images", "0"]
    assert compare.main(argv) == 0
    config = json.loads((out / "el_nivmf+guidance_weight=0" / "seed0" / "config.json").read_text())
    assert config["loss"] == "el_nivmf" and config["loss_options"] == {"guidance_weight": 0}
    assert f"| `{variant}` | 0 |" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        compare.main(["--losses", "el_nivmf:oops", "--output-dir", str(tmp_path / "x")])


def test_learning_rate_search_chooses_on_validation_and_variants_inherit(compare, tmp_path, capsys):
    """--search-lr: one run per (base loss, rate) with the search seed; each loss's seeds train with the
    rate of the best validation R@1 (read here from the runs' history), its variants with the same rate."""
    data_root = make_folder_dataset(tmp_path / "data")
    out = tmp_path / "compare"
    rates = ("1e-05", "0.01")
    argv = ["--losses", "proxy_anchor", "proxy_anchor:alpha=16", "--seeds", "0", "--search-lr", *rates,
            "--search-seed", "5", "--dataset", "folder", "--data-root", str(data_root), "--output-dir", str(out),
            "--epochs", "2", "--trunk", "frozen", "--backbone", "tiny", "--weights", "none", "--embed-dim", "16",
            "--batch-size", "8", "--eval-batch-size", "16", "--val-fraction", "0.25", "--device", "cpu",
            "--degradation-images", "0"]
    assert compare.main(argv) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (out / "search").iterdir()) == ["proxy_anchor"]  # the variant is not searched
    scores = {}
    for rate in rates:
        run = out / "search" / "proxy_anchor" / f"lr{float(rate):g}"
        config = json.loads((run / "config.json").read_text())
        assert config["seed"] == 5 and config["lr"] == float(rate) and config["loss_options"] == {}
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        scores[float(rate)] = max(h["val"]["recall@1"] for h in history)  # the selected epoch's value
    best = max(scores.values())
    chosen = min(rate for rate, score in scores.items() if score == best)
    for loss in ("proxy_anchor", "proxy_anchor+alpha=16"):
        assert json.loads((out / loss / "seed0" / "config.json").read_text())["lr"] == chosen
    results = json.loads((out / "results.json").read_text())
    assert results["search"]["proxy_anchor"]["chosen"] == chosen
    assert results["search"]["proxy_anchor"]["trials"] == {repr(r): s for r, s in scores.items()}
    table = (out / "results.md").read_text()
    assert "Learning-rate search (seed 5" in table and f"**{best:.3f}**" in table
    assert f"| `proxy_anchor` | 0 | {chosen:g} |" in table  # the per-run table names each run's rate
    # the rate is the search's to set, and a finished run with another rate is not silently reused
    with pytest.raises(SystemExit):
        compare.main([*argv, "--lr", "1e-3"])
    other = [r for r in scores if r != chosen][0]
    config_path = out / "proxy_anchor" / "seed0" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "lr": other}))
    docs = tmp_path / "results.md"
    docs.write_text(f"{compare.BEGIN}\nold\n{compare.END}\n")
    assert compare.main([*argv, "--write-docs", "--docs", str(docs)]) == 1
    err = capsys.readouterr().err
    assert "but the search chose" in err and "not updated" in err
    results = json.loads((out / "results.json").read_text())
    assert "0" not in results["losses"].get("proxy_anchor", {}).get("runs", {})  # the stale run is not tabulated
    assert "old" in docs.read_text()


def test_search_choice_and_validation_score(compare, tmp_path):
    """The rate of the highest validation score wins, a tie goes to the smaller rate, an unfinished or
    failed run has no score; the score is the selection metric at the selected epoch, not the last or
    the largest; a finished run without validation metrics is an error, not a silent None."""
    assert compare.choose_lr({1e-4: 0.5, 2e-4: 0.7, 4e-4: 0.6}) == 2e-4
    assert compare.choose_lr({4e-4: 0.7, 1e-4: 0.7, 2e-4: None}) == 1e-4
    assert compare.choose_lr({1e-4: None}) is None
    run = tmp_path / "run"
    run.mkdir()
    assert compare.validation_score(run) is None
    (run / "config.json").write_text(json.dumps({"selection_metric": "map@r"}))
    history = [{"epoch": 1, "val": {"recall@1": 0.9, "map@r": 0.2}},
               {"epoch": 2, "val": {"recall@1": 0.1, "map@r": 0.4}},
               {"epoch": 3, "val": {"recall@1": 0.5, "map@r": 0.3}}]
    (run / "history.jsonl").write_text("\n".join(json.dumps(h) for h in history) + "\n")
    (run / "final_metrics.json").write_text(json.dumps({"selected_epoch": 2}))
    assert compare.validation_score(run) == 0.4
    (run / "final_metrics.json").write_text(json.dumps({"selected_epoch": 4}))
    with pytest.raises(ValueError, match="validation split"):
        compare.validation_score(run)
    assert compare.search_finished(run)
    failed = tmp_path / "failed"
    failed.mkdir()
    assert not compare.search_finished(failed)
    (failed / compare.FAILED_MARKER).write_text("{}")
    assert compare.search_finished(failed) and compare.validation_score(failed) is None
    assert compare.search_dir(tmp_path, "x", 2.5e-05).name == "lr2.5e-05"


def test_reserved_flags_and_markers(compare, tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--output-dir", str(tmp_path), "--seed", "3"])
    with pytest.raises(ValueError):
        compare.replace_between_markers("no markers", "x")
    assert compare.replace_between_markers(f"a{compare.BEGIN}b{compare.END}c", "new") == \
        f"a{compare.BEGIN}\nnew\n{compare.END}c"
