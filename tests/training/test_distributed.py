"""Data-parallel training (torch.distributed, gloo on CPU) and gradient accumulation.

A step's global batch is cut into micro-batches (processes x --grad-accum) whose noise is seeded per micro-batch,
so (1) K processes x 1 micro-batch equal 1 process x K micro-batches, and (2) for a loss whose noise does not
depend on the cut at all (`PerSampleFM`), any cut equals the single-process step on the whole batch. Tolerances
are float rounding: the gradient sums are formed in another order (see `assert_same_step`).

Each test starts its processes itself (2 processes x 1 thread); the file takes ~40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_square_store

from dapolicy.policies import FMPolicy, load_pretrained
from dapolicy.policies.registry import make_config
from dapolicy.train import train
from dapolicy.training.checkpoint import load_checkpoint
from dapolicy.training.distributed import DistEnv, my_pieces, split_batch
from dapolicy.training.metrics import read_metrics

FAST = dict(method="fm", config="tiny", threads=1, progress=False, device="cpu", seed=5)
ONE_STEP = {"vae": 1, "policy": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PerSampleFM(FMPolicy):
    """FM whose loss is the mean of per-sample losses, each drawing its noise from a seed of the sample's own
    data bytes: a loss that does not depend on how the batch is cut, so every cut must reproduce the big batch."""

    def compute_loss(self, batch: Mapping[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        n = next(iter(batch.values())).shape[0]
        losses = []
        for i in range(n):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            raw = sorted(k for k in one if k in ("images", "action", "proprio"))  # data, not computed latents
            key = b"".join(one[k].cpu().contiguous().numpy().tobytes() for k in raw)
            torch.manual_seed(zlib.crc32(key))
            losses.append(super().compute_loss(one, stage)["loss"])
        return {"loss": torch.stack(losses).mean()}


def per_sample_fm(spec: Any) -> PerSampleFM:
    return PerSampleFM(make_config("fm", "tiny"), spec)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_square_store(tmp_path_factory.mktemp("square") / "data")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """Raw weights and EMA of the last checkpoint."""
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    return {**{f"raw.{k}": v for k, v in ckpt["model"].items()},
            **{f"ema.{k}": v for k, v in ckpt["ema"]["shadow"].items()}}


def assert_close(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(((wa[k].double() - wb[k].double()).abs().max().item(), k) for k in wa if wa[k].is_floating_point())
    assert worst[0] <= atol, f"largest difference {worst[0]:.3g} in {worst[1]}"


def assert_same_step(a: Path, b: Path) -> None:
    """Two runs of one optimizer step per stage took the same step up to float rounding.

    The gradients (AdamW's first moment after one step is (1 - beta1) * g) must agree to ~1e-6 of the largest.
    The weights get a looser bound: AdamW divides by the gradient's own size, so a parameter whose gradient is
    zero up to rounding (a bias in front of a GroupNorm) moves by up to the learning rate (6e-5 in the first
    step) in a direction the rounding picks; the mean difference stays tiny.
    """
    sa = load_checkpoint(a / "checkpoints" / "last.pt")["optimizer"]["state"]
    sb = load_checkpoint(b / "checkpoints" / "last.pt")["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    scale = max(s["exp_avg"].abs().max().item() for s in sa.values())
    for i in sa:
        ga, gb = sa[i]["exp_avg"], sb[i]["exp_avg"]
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6 * scale), f"gradient of parameter {i} differs"
    wa, wb = _weights(a), _weights(b)
    diffs = torch.cat([(wa[k].double() - wb[k].double()).abs().flatten() for k in wa if wa[k].is_floating_point()])
    assert diffs.max().item() <= 1.5e-4 and diffs.mean().item() <= 1e-8, (diffs.max().item(), diffs.mean().item())


def test_split_helpers() -> None:
    assert split_batch(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert split_batch(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert [list(my_pieces(3, DistEnv(r, 2))) for r in range(2)] == [[0], [1, 2]]
    assert [list(my_pieces(1, DistEnv(r, 2))) for r in range(2)] == [[], [0]]  # fewer pieces than processes


@pytest.fixture(scope="module")
def big_batch(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One optimizer step per stage of `PerSampleFM` in one process, on the whole batch (the plain step)."""
    out = tmp_path_factory.mktemp("big") / "run"
    return train(store, out, steps=ONE_STEP, batch_size=6, policy_factory=per_sample_fm, **FAST)


@pytest.mark.parametrize("k", [2, 4])
def test_grad_accumulation_equals_big_batch(store: Path, big_batch: Path, tmp_path: Path, k: int) -> None:
    run = train(store, tmp_path / "run", steps=ONE_STEP, batch_size=6, policy_factory=per_sample_fm,
                grad_accum=k, **FAST)  # k=4: micro-batches of 2, 2, 1, 1
    assert json.loads((run / "config.json").read_text())["train"]["micro_batches"] == k
    assert_same_step(big_batch, run)


def _ddp_worker(rank: int, world: int, port: int, store: str, out: str) -> None:
    """One process of a gloo job, set up the way torchrun sets up its workers."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    train(store, out, steps=ONE_STEP, batch_size=6, policy_factory=per_sample_fm, **FAST)


def test_ddp_step_equals_single_process_step(store: Path, big_batch: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(store), str(out)), nprocs=2, join=True)
    env = json.loads((out / "config.json").read_text())["environment"]
    assert env["world_size"] == 2 and env["backend"] == "gloo"
    assert_same_step(big_batch, out)


def _torchrun(store: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "dapolicy.train", "--data", str(store), "--out", str(out),
           "--method", "fm", "--config", "tiny", "--seed", "5", "--threads", "1", "--device", "cpu",
           "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_torchrun_run_and_resume_on_one_process(store: Path, tmp_path: Path) -> None:
    steps = {"vae": 2, "policy": 3}
    kw = dict(FAST, steps=steps, batch_size=4)
    out = tmp_path / "two"
    done = _torchrun(store, out, "--steps", "vae=2,policy=3", "--batch-size", "4", "--stop-after", "3",
                     "--lean-data")  # both processes build / share the memory-mapped image cache
    # rank 0 alone reports and writes: one summary line, one record per step, the VAE stage's model loads
    assert done.stdout.count("run folder:") == 1 and done.stdout.count("stage 'vae' done") == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["environment"]["world_size"] == 2 and cfg["train"]["micro_batches"] == 2 and cfg["train"]["lean_data"]
    keys = [(r["stage"], r["kind"], r["step"]) for r in read_metrics(out / "metrics.jsonl")]
    assert len(keys) == len(set(keys)) and ("vae", "stage_end", 2) in keys
    assert (out / "plots" / "loss_vae.png").stat().st_size > 0
    assert type(load_pretrained(out / "model")) is FMPolicy
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (last["stage"], last["step"], last["world_size"]) == ("policy", 1, 2)
    # = one process accumulating the same two micro-batches (with the images in RAM: the same bytes)
    same = train(store, tmp_path / "accum_stopped", grad_accum=2, stop_after=3, **kw)
    assert_close(same, out)
    # resume the 2-process run in 1 process: it keeps 2 micro-batches per step and accumulates them
    train(store, out, resume=True, **kw)
    assert json.loads((out / "state.json").read_text())["stages_done"] == ["vae", "policy"]
    assert json.loads((out / "config.json").read_text())["train"]["micro_batches"] == 2
    reference = train(store, tmp_path / "accum", grad_accum=2, **kw)
    assert_close(reference, out)
    assert type(load_pretrained(out / "model")) is FMPolicy


def test_cli_flags() -> None:
    import argparse

    from dapolicy.train import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    base = ["--data", "d", "--out", "o"]
    args = parser.parse_args(base)
    assert (args.amp, args.compile, args.grad_accum, args.lean_data) == (None, None, None, None)  # keep stored
    args = parser.parse_args([*base, "--no-amp", "--compile", "--grad-accum", "3", "--lean-data"])
    assert (args.amp, args.compile, args.grad_accum, args.lean_data) == (False, True, 3, True)


def _broadcast_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dapolicy.training.distributed import broadcast_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # every rank starts different
    module = torch.nn.Linear(3, 2)
    module.register_buffer("flags", torch.tensor([rank == 0, rank == 1]))
    module.register_buffer("strided", torch.randn(4, 3).t())  # not contiguous
    versions = [t._version for t in module.state_dict(keep_vars=True).values()]
    broadcast_state(module)
    after = [t._version for t in module.state_dict(keep_vars=True).values()]
    torch.save({"state": module.state_dict(), "bumped": all(a > b for a, b in zip(after, versions))},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_broadcast_state_copies_rank_zero_and_bumps_every_version(tmp_path: Path) -> None:
    """Every rank ends with rank 0's tensors (bool and non-contiguous ones included), written in a way that
    bumps their version counters: the fast sampler's caches of weight-derived values are keyed on them."""
    mp.spawn(_broadcast_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert zero["bumped"] and one["bumped"]
    for key, value in zero["state"].items():
        torch.testing.assert_close(one["state"][key], value, rtol=0, atol=0)
    assert zero["state"]["flags"].tolist() == [True, False]
