"""dml.train under DDP on CPU: 2 processes with the gloo backend on a tiny generated folder dataset.

* one step of 2 processes × b images equals one single-process step of 2b images (weights of model and
  loss, and the loss value) for per-sample-mean losses, fine-tuning and frozen trunk;
* the sharded, gathered evaluation gives exactly the single-process metrics;
* ``torchrun --standalone --nproc_per_node=2 -m dml.train`` runs an epoch end to end, rank 0 writing once;
* a 2-process run interrupted on one rank (a real SIGINT) stops on both at the same step, and
  ``--resume`` under 2 processes ends with exactly the weights of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dml import trainer as train_module
from dml.checkpoint import load_checkpoint
from dml.config import parse_config
from dml.distributed import DistContext, init_from_env
from dml.pipeline import local_part
from dml.train import main
from dml.trainer import Trainer
from tests.dml.tiny_runs import make_folder_dataset, tiny_args, tiny_trainer

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
CASES = [("norm_softmax", "finetune"), ("el_vmf", "finetune"), ("norm_softmax", "frozen"), ("el_vmf", "frozen"),
         ("norm_softmax", "device")]  # "device": fine-tuning with the images and crops on the device


def _trunk_flags(trunk: str) -> list[str]:
    if trunk == "device":
        return ["--trunk", "finetune", "--device-augment", "on"]
    return ["--trunk", trunk, "--device-augment", "off"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # mixed image sizes, so that the random crops of other ranks' images consume varying draws
    return make_folder_dataset(tmp_path_factory.mktemp("ddp_data"), mixed_sizes=True)


def _args(data_root, out, *extra):
    # --batch-size is the global batch: 2 processes x 4 images; 5 evaluation images per batch deal an
    # uneven number of evaluation batches to the two processes
    return tiny_args(data_root, out, "--feature-views", "2", *extra, eval_batch_size=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_env(rank: int, world: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)


def _spawn(fn, *args, timeout=120):
    """Run ``fn(rank, *args)`` in WORLD fresh processes; fail (never hang) if one fails or time runs out."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                raise AssertionError(f"{fn.__name__}: the processes did not finish within {timeout} s (deadlock?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _one_step(trainer: Trainer) -> torch.Tensor:
    """The first step of epoch 0 (this process's part of the first global batch)."""
    trainer.model.train()
    trainer.loss.train()
    trainer.sampler.set_epoch(0)
    inputs, labels = next(trainer.pipeline.train_batches(trainer.epoch_batches(), 0))
    return trainer.train_step(inputs, labels)


def _snapshot(trainer: Trainer, value, metrics) -> dict:
    named = {}
    for part, module in (("model", trainer.model), ("loss", trainer.loss)):
        named.update({f"{part}.{name}": p for name, p in module.named_parameters()})
    lrs = {}  # the learning rate each parameter's step used (the scheduler has moved on since)
    for group, lr in zip(trainer.optimizer.param_groups, trainer.scheduler.base_lrs):
        for p in group["params"]:
            lrs[id(p)] = lr * trainer.scheduler.lr_lambdas[0](0)
    return {"grad": {k: p.grad.clone() for k, p in named.items() if p.grad is not None},
            "param": {k: p.detach().clone() for k, p in named.items()},
            "lr": {k: lrs.get(id(p), 0.0) for k, p in named.items()},
            "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "loss": {k: v.clone() for k, v in trainer.loss.state_dict().items()},
            "value": float(value), "metrics": metrics}


def _equivalence_worker(rank, port, data_root, out):
    _set_env(rank, WORLD, port)
    dist = init_from_env()
    try:
        assert dist.enabled and dist.world_size == WORLD and dist.rank == rank
        results = {}
        for loss, trunk in CASES:
            config = parse_config(_args(data_root, Path(out) / f"{loss}-{trunk}", "--loss", loss, *_trunk_flags(trunk)))
            trainer = tiny_trainer(config, dist=dist)
            metrics = trainer.evaluate("test")  # gathered embeddings, identical weights on both sides
            value = _one_step(trainer)
            results[(loss, trunk)] = _snapshot(trainer, value, metrics)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        trainer = None  # release DDP before leaving the group (DistContext.close)
        dist.close()


def _max_relative_difference(a: dict, b: dict) -> float:
    """max over tensors of ||a - b||_inf / ||b||_inf."""
    worst = 0.0
    for key in b:
        ref = b[key].double()
        scale = ref.abs().max().item() or 1.0
        worst = max(worst, (a[key].double() - ref).abs().max().item() / scale)
    return worst


GRAD_RTOL = 2e-6  # relative to each gradient tensor's largest entry (measured: <= 6.5e-7)
WEIGHT_RTOL = 1e-6  # relative to each weight tensor's largest entry
ADAM_EPS = 1e-8


def _assert_same_step(ddp: dict, single: dict, label) -> tuple[float, float]:
    """Gradients (averaged over the processes by DDP) within GRAD_RTOL; weights after the AdamW step within
    WEIGHT_RTOL plus what Adam's first step, lr * g / (|g| + eps), makes of a gradient difference of
    GRAD_RTOL: lr * eps * dg / (|g| + eps)^2, which is large only where |g| is comparable to eps."""
    grad_diff = _max_relative_difference(ddp["grad"], single["grad"])
    assert grad_diff <= GRAD_RTOL, (label, "gradients", grad_diff)
    assert ddp["grad"].keys() == single["grad"].keys()
    for key, w in single["param"].items():
        w, w_ddp = w.double(), ddp["param"][key].double()
        if key not in single["grad"]:  # the frozen trunk
            assert torch.equal(w, w_ddp), (label, key)
            continue
        g = single["grad"][key].double()
        dg = GRAD_RTOL * g.abs().max()
        bound = WEIGHT_RTOL * w.abs().max() + single["lr"][key] * ADAM_EPS * dg / (g.abs() + ADAM_EPS) ** 2 + 1e-12
        excess = (w_ddp - w).abs() - bound
        assert excess.max() <= 0, (label, key, float(excess.max()))
    for part in ("model", "loss"):  # buffers included (the head's output scale, BatchNorm statistics)
        for key in single[part]:
            assert single[part][key].shape == ddp[part][key].shape
    return grad_diff, max(_max_relative_difference(ddp["model"], single["model"]),
                          _max_relative_difference(ddp["loss"], single["loss"]))


def test_one_ddp_step_equals_one_single_process_step(data_root, tmp_path):
    """2 processes x 4 images == 1 process x 8 images: after one step the gradients and weights of model and
    loss agree to float rounding (the losses are per-sample means); the gathered evaluation is bit-identical."""
    _spawn(_equivalence_worker, _free_port(), str(data_root), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for loss, trunk in CASES:
        config = parse_config(_args(data_root, tmp_path / "single", "--loss", loss, *_trunk_flags(trunk)))
        single = tiny_trainer(config)
        initial = {k: v.clone() for k, v in single.model.state_dict().items()}
        metrics = single.evaluate("test")
        value = _one_step(single)
        ref = _snapshot(single, value, metrics)
        r0, r1 = ranks[0][(loss, trunk)], ranks[1][(loss, trunk)]
        for part in ("model", "loss", "grad"):  # DDP keeps the processes identical
            for key in r0[part]:
                assert torch.equal(r0[part][key], r1[part][key]), (loss, trunk, part, key)
        moved = _max_relative_difference(ref["model"], initial)
        assert moved > 1e-4, "the step must change the weights for the comparison to mean anything"
        grad_diff, weight_diff = _assert_same_step(r0, ref, (loss, trunk))
        print(f"{loss}/{trunk}: max relative difference DDP vs single: gradients {grad_diff:.1e}, weights "
              f"{weight_diff:.1e} (the step moved the weights by {moved:.1e})")
        # the mean of the two local losses is the loss of the global batch
        assert (r0["value"] + r1["value"]) / 2 == pytest.approx(ref["value"], rel=1e-6)
        # evaluation: batches dealt round-robin, embedded as in one process, gathered: the same metrics
        assert r0["metrics"] == ref["metrics"] == r1["metrics"], (loss, trunk)


def test_pipeline_part_is_the_samplers_part():
    from dml.data import ClassBalancedBatchSampler

    labels = [i // 3 for i in range(60)]
    for rank in range(WORLD):
        sampler = ClassBalancedBatchSampler(labels, 12, 2, seed=1, num_replicas=WORLD, rank=rank)
        sampler.set_epoch(2)
        mine = local_part(12, rank, WORLD)
        assert list(sampler) == [b[mine] for b in sampler.global_batches()]


def test_single_process_context_is_a_no_op():
    dist = DistContext()
    assert not dist.enabled and dist.is_main and dist.world_size == 1
    assert dist.any(True) and not dist.any(False)
    assert dist.on_main(lambda: 5) == 5 and dist.broadcast_object("x") == "x"
    t = torch.arange(3.0)
    assert dist.all_gather_rows(t)[0] is t and dist.all_reduce_sum(t) is t
    with pytest.raises(ValueError, match="boom"):
        dist.agree(ValueError("boom"))
    dist.barrier()
    dist.close()


# ------------------------------------------------------------------------------------------------
# end to end with torchrun, and resume


E2E = ["--loss", "el_nivmf", "--trunk", "frozen", "--epochs", "1"]  # Monte-Carlo: exercises per-rank RNG states


@pytest.fixture(scope="module")
def torchrun_run(data_root, tmp_path_factory):
    """``torchrun --standalone --nproc_per_node=2 -m dml.train`` for one epoch (3 steps of 2 x 4 images)."""
    out = tmp_path_factory.mktemp("ddp_e2e") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "dml.train", *_args(data_root, out, *E2E)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    return out, proc


def test_torchrun_end_to_end(torchrun_run):
    out, proc = torchrun_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name in ("config.json", "history.jsonl", "last.pt", "best.pt", "initial_metrics.json", "final_metrics.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
    assert proc.stdout.count("final_metrics.json") == 1, proc.stdout  # rank 0 alone writes and prints
    assert proc.stdout.count("DDP: 2 processes, global batch 8 = 2 x 4") == 1, proc.stdout
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["world_size"] == WORLD and final["selected_epoch"] == 1 and 0 <= final["recall@1"] <= 1
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and np.isfinite(history[0]["train"]["loss"])
    state = load_checkpoint(out / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    assert state["world_size"] == WORLD and len(state["rng_per_rank"]) == WORLD
    # the processes drew different Monte-Carlo noise (rank 1 reseeded), and both states were saved
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])


def _interrupted_worker(rank, port, argv, interrupt_rank, interrupt_step, codes):
    """main(argv) on 2 processes; ``interrupt_rank`` alone gets a real SIGINT during step ``interrupt_step``."""
    _set_env(rank, WORLD, port)
    if rank == interrupt_rank:
        original = train_module.Trainer.train_epoch

        def train_epoch(self):
            embed = self.pipeline.embed_train
            seen = {"n": 0}

            def embed_then_signal(inputs):
                seen["n"] += 1
                if seen["n"] == interrupt_step:
                    os.kill(os.getpid(), signal.SIGINT)
                return embed(inputs)

            self.pipeline.embed_train = embed_then_signal
            return original(self)

        train_module.Trainer.train_epoch = train_epoch
    code = main(argv)
    Path(codes, f"rank{rank}").write_text(str(code))


def test_interrupt_on_one_rank_and_resume_equals_uninterrupted(data_root, tmp_path, torchrun_run):
    straight, proc = torchrun_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    broken = tmp_path / "broken"
    codes = tmp_path / "codes"
    codes.mkdir()
    # rank 1 alone is interrupted during step 2: both ranks must stop before step 3 (no deadlock)
    _spawn(_interrupted_worker, _free_port(), _args(data_root, broken, *E2E), 1, 2, str(codes))
    assert [(codes / f"rank{r}").read_text() for r in range(WORLD)] == ["130", "130"]
    state = load_checkpoint(broken / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    assert not (broken / "final_metrics.json").exists()
    _spawn(_interrupted_worker, _free_port(), ["--resume", str(broken)], -1, 0, str(codes))
    assert [(codes / f"rank{r}").read_text() for r in range(WORLD)] == ["0", "0"]
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(broken / "last.pt")
    for part in ("model", "loss"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for key, value in a["optimizer"]["state"].items():
        for name in value:
            assert torch.equal(torch.as_tensor(value[name]), torch.as_tensor(b["optimizer"]["state"][key][name]))
    history_a, history_b = ([json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
                            for run in (straight, broken))
    assert len(history_a) == len(history_b) == 1
    assert history_a[0]["val"] == history_b[0]["val"]
    # the epoch loss is a float64 sum over processes and steps, added up in another order after the resume
    assert history_a[0]["train"] == pytest.approx(history_b[0]["train"], rel=1e-12)
    final_a = json.loads((straight / "final_metrics.json").read_text())
    final_b = json.loads((broken / "final_metrics.json").read_text())
    assert final_a["recall@1"] == final_b["recall@1"] and final_a["map@r"] == final_b["map@r"]
