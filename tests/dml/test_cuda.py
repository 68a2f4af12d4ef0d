"""dml on a CUDA device: no host synchronisation in a loss's backward, and the trainer's GPU paths end to end.

Skipped without CUDA; run on the GPU machine by benchmarks/gpu.sh. On CUDA ``--device cuda`` switches on
bf16 autocast, channels-last and the on-device image pipeline (their ``auto`` defaults), and torchrun
initialises the ``cpu:gloo,cuda:nccl`` process group, so these runs execute every GPU-only branch of the
trainer once.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dml.losses import LOSSES, build_loss
from tests.dml.tiny_runs import make_folder_dataset, tiny_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

REPO = Path(__file__).resolve().parents[2]


@functools.cache
def _cuda_clock():
    """benchmarks/train_throughput.py's Clock: the tests count syncs exactly as the benchmark reports them."""
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Clock(torch.device("cuda"))


def _count_syncs(fn) -> int:
    """Host synchronisations during one call of fn."""
    return _cuda_clock().count_syncs(fn)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_step_on_cuda_has_no_host_sync_in_backward(name):
    from dml.runtime import distribution_validation as _validation

    # el_nivmf's rejection sampler checks "all rows accepted?" once, and again after each block of masked
    # rounds if some rows were rejected; every other loss is closed-form
    forward_syncs = 3 if name == "el_nivmf" else 0

    torch.manual_seed(0)
    loss = build_loss(name, num_classes=1000, embed_dim=128).cuda()
    emb = (torch.randn(112, 128, device="cuda") * 20).requires_grad_()
    labels = torch.randint(0, 1000, (112,), device="cuda")
    with _validation(False):
        for _ in range(2):  # the first call fills per-device caches (e.g. quadrature nodes) once
            loss(emb, labels).backward()
        box = {}
        n_forward = _count_syncs(lambda: box.setdefault("value", loss(emb, labels)))
        n_backward = _count_syncs(lambda: box["value"].backward())
    assert n_forward <= forward_syncs, f"{n_forward} host synchronisation(s) in the {name} forward"
    assert n_backward == 0, f"{n_backward} host synchronisation(s) in the {name} backward"
    assert torch.isfinite(emb.grad).all() and all(torch.isfinite(p.grad).all() for p in loss.parameters()
                                                   if p.grad is not None)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("cuda_data") / "data", mixed_sizes=True)


def _run(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert 0 <= final["recall@1"] <= 1 and (out / "report.md").is_file()
    return final, proc


def _gpu_args(data_root, out, *extra):
    args = tiny_args(data_root, out, "--loss", "el_nivmf", "--epochs", "2", *extra)
    return [a if a != "cpu" else "cuda" for a in args]  # tiny_args' --device cpu -> cuda


@pytest.mark.parametrize("extra", [(), ("--trunk", "frozen"), ("--compile",)], ids=["finetune", "frozen", "compile"])
def test_tiny_training_run_on_cuda(data_root, tmp_path, extra):
    """bf16 autocast, channels-last and the device image pipeline (fine-tuning) or the feature cache (frozen)."""
    out = tmp_path / "run"
    final, proc = _run([sys.executable, "-m", "dml.train", *_gpu_args(data_root, out, *extra)], out)
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cuda"
    auroc = final["uncertainty"]["auroc_kappa"]  # vMF loss: κ statistics computed on the device
    assert auroc is None or 0 <= auroc <= 1
    assert all(math.isfinite(v) for v in final["uncertainty"]["degradation"]["mean_kappa"])


def test_torchrun_nccl_one_process(data_root, tmp_path):
    """torchrun with one CUDA process: process group cpu:gloo,cuda:nccl, DDP on the device, gathered evaluation."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "dml.train", *_gpu_args(data_root, out)]
    _run(cmd, out)  # DDP is used whenever torchrun starts the run, also with one process
