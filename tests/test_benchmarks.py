"""The small-batch benchmarks run (a tiny configuration, seconds): their tables are what the docs quote."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TINY = ["--batches", "1", "--rounds", "1", "--block-seconds", "0.001"]


def _table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| p ")]


def test_small_batch_prints_a_row_per_configuration(capsys):
    small_batch = pytest.importorskip("small_batch")
    small_batch.main(["--dims", "3", "10", "--libraries", "vmf_dists", "Normal", *TINY])
    rows = _table_rows(capsys.readouterr().out)
    assert [row[:2] for row in rows] == [["3", "1"], ["10", "1"]]
    assert all(int(row[3]) > 0 and int(row[5]) > 0 for row in rows)  # operations per call


def test_eager_floor_prints_a_row_per_configuration(capsys):
    """The floor does fewer operations than the library's step and runs forward and backward."""
    eager_floor = pytest.importorskip("eager_floor")
    eager_floor.main(["--dims", "3", "10", *TINY])
    rows = _table_rows(capsys.readouterr().out)
    assert [row[:2] for row in rows] == [["3", "1"], ["10", "1"]]
    for row in rows:
        normal_ops, floor_ops, library_ops = int(row[3]), int(row[5]), int(row[7])
        assert normal_ops < floor_ops < library_ops
