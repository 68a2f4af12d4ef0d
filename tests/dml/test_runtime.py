"""dml.runtime: the glibc allocator settings that the command lines apply at start-up (issue #13,
finding 10), and the run lock that leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.dml.tiny_runs import REPO

_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "on":
    from dml.runtime import configure_allocator
    assert configure_allocator()
x = torch.ones(1)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):  # warm up: the heap settles within the first few blocks (see the test)
    torch.empty(16 * 1024 * 1024).fill_(1.0)
counts = []
for _ in range(20):  # 64 MiB freed and allocated again, as activations are at every step
    start = faults()
    torch.empty(16 * 1024 * 1024).fill_(1.0)
    counts.append(faults() - start)
print(sum(count > 16000 for count in counts))  # blocks faulted in afresh
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_settings_stop_the_page_faults():
    """Without the settings every 64 MiB block is a fresh mmap that faults in all its 16384 pages; with
    them the block is reused from the heap. With the settings the heap still grows afresh for the first
    few blocks of a process, and in some processes once more later: how often depends on the process's
    memory layout (measured with the earlier six-block warm-up on torch 2.3.1: one late growth in 1 of 16
    processes with address-space randomisation off, in 11 of 16 with it on and PYTHONHASHSEED=0, never
    two). So the count starts after twelve blocks and allows one growth; without the settings all 20
    blocks fault. The fewest of three runs per mode guards against a page the kernel reclaims now and then."""
    counts = {}
    for mode in ("off", "on"):
        runs = []
        for _ in range(3):
            result = subprocess.run([sys.executable, "-c", _FAULTS, mode], cwd=REPO, capture_output=True, text=True,
                                    timeout=120, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
            assert result.returncode == 0, result.stderr
            runs.append(int(result.stdout.split()[-1]))
        counts[mode] = min(runs)
    assert counts["off"] == 20, counts  # every block faulted in again
    assert counts["on"] <= 1, counts  # at most one late growth of the heap (see above)


@pytest.mark.parametrize("module", ["dml.train", "dml.evaluate"])
def test_command_lines_apply_the_allocator_settings(module, monkeypatch):
    import importlib

    cli = importlib.import_module(module)
    called = []
    monkeypatch.setattr(cli, "configure_allocator", lambda: called.append(True) or True)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert called == [True]


def test_run_lock_is_exclusive_and_removed(tmp_path):
    from dml.config import ConfigError
    from dml.runtime import run_lock

    with run_lock(tmp_path):
        assert (tmp_path / ".lock").exists()
        with pytest.raises(ConfigError, match="in use by another dml process"), run_lock(tmp_path):
            pass
    assert not (tmp_path / ".lock").exists()
