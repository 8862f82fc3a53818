"""Data-parallel training on torch.distributed: the process group, and the few collectives the trainer needs.

Started by `torchrun` (or any launcher that sets WORLD_SIZE / RANK / LOCAL_RANK and MASTER_ADDR / MASTER_PORT),
every process runs the same `train` call. The design keeps a run a function of (seed, micro-batch count), not
of how many processes share it:

* the global batch of step n is what a single process draws (`EpochIndexer`); it is cut into M contiguous
  micro-batches (`split_batch`), and each process takes a contiguous block of them (`my_pieces`);
* the random draws of micro-batch m are seeded from (seed, stage, n, m) (`piece_seed`), so which process or
  which accumulation round computes it does not matter;
* gradients are all-reduced by hand (`all_reduce_gradients`) instead of through DistributedDataParallel:
  policies compute losses through their sub-modules rather than the stage module's `forward`, and unwrapped
  modules keep EMA, checkpoints and exact resume exactly as in the single-process trainer.

Rank 0 alone writes to the run folder; the others wait at `barrier()` where they need what it wrote. The run
folder must therefore be on a filesystem every node sees (as the data must be).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from dapolicy.training.checkpoint import step_seed

#: Minutes a process waits in a collective (e.g. for rank 0 to build the latent cache) before giving up.
TIMEOUT_ENV = "DAP_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 120
_PIECE_SALT = 1000  # step_seed salts of micro-batches (7, 11, 13 are taken by the epoch, val and val-batch seeds)
_VAL_PIECE_SALT = 100_000


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_os() -> DistEnv:
    """The job layout a launcher (torchrun, SLURM + torchrun, mp.spawn with env vars) put in the environment."""
    if dist.is_available() and dist.is_initialized():  # a caller set the group up itself
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    return DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def current() -> DistEnv:
    """The layout of the running job (after `init`), else of the environment."""
    return env_from_os()


def is_main() -> bool:
    """Whether this process logs and writes (rank 0, or the only process)."""
    return current().is_main


def init(env: DistEnv, device: torch.device) -> bool:
    """Join the process group once (gloo for CPU, NCCL for CUDA); True when this call created it (and the
    matching `shutdown` should destroy it)."""
    if not env.enabled or dist.is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: run one process")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={env.world_size} but {name} is not set: start the job with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds NCCL to this rank's GPU (and makes barriers use it)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(minutes=minutes), **kwargs)
    return True


def shutdown(created: bool, synchronise: bool = False) -> None:
    """Leave the process group this process joined. synchronise (after a run that finished on every rank): meet
    the other ranks at a barrier first, so that no rank tears gloo down (rank 0 hosts its store) while another
    still has work in flight; under load an unsynchronised teardown was seen to abort a rank at exit. Not after
    an error: a rank that failed alone would wait at the barrier until the timeout."""
    if not (created and dist.is_initialized()):
        return
    try:
        if synchronise:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def device_for(env: DistEnv, requested: torch.device) -> torch.device:
    """Each process of a CUDA job uses cuda:LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES)."""
    if not env.enabled or requested.type != "cuda":
        return requested
    if requested.index is not None and requested.index != env.local_rank:
        raise ValueError(f"--device {requested} under torchrun: each process uses cuda:LOCAL_RANK; pass "
                         f"--device cuda (or auto) and pick GPUs with CUDA_VISIBLE_DEVICES")
    if env.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", env.local_rank)


# ------------------------------------------------------------------------------------------------ collectives
def _collective_device() -> torch.device:
    """Where collective tensors live: NCCL needs them on this rank's GPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (identity in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_together(error: BaseException | None) -> None:
    """Collective error check: if any rank has an error, every rank raises it (rank order decides which),
    instead of one rank leaving and the others waiting in the next collective until the timeout."""
    errors = gather_objects(_picklable(error))
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn` on rank 0 only (e.g. a write to the run folder) while the others wait; every rank returns rank
    0's result, or raises its error. A single process just calls `fn`."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn(*args, **kwargs)
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # travels to the other ranks, then raised everywhere
            error = e
    result, error = broadcast_object((result, _picklable(error)))
    if error is not None:
        raise error
    return result


def _picklable(error: BaseException | None) -> BaseException | None:
    if error is None:
        return None
    try:
        pickle.dumps(error)
        return error
    except Exception:  # an exception that cannot travel: keep its type name and message
        return RuntimeError(f"{type(error).__name__}: {error}")


def sum_floats(values: Sequence[float]) -> list[float]:
    """Element-wise sum of equally long float lists over the ranks (float64)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank `src`'s (a cheap guard at every stage start:
    replicas that start equal and apply the same all-reduced gradients stay equal)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for tensor in module.state_dict(keep_vars=True).values():
        # Received into a copy, then written with a plain in-place copy: that bumps the tensor's version
        # counter, which the fast sampler's caches of weight-derived values are keyed on (a collective writing
        # straight into `param.data` would leave them stale).
        source = tensor.detach().to(torch.uint8) if tensor.dtype == torch.bool else tensor.detach()  # gloo: no bool
        buffer = source.clone(memory_format=torch.contiguous_format)
        dist.broadcast(buffer, src)
        tensor.copy_(buffer.bool() if tensor.dtype == torch.bool else buffer)


@torch.no_grad()
def all_reduce_gradients(params: Sequence[torch.nn.Parameter], extra: Sequence[float]) -> list[float]:
    """Sum every parameter's gradient over the ranks, plus a few floats (e.g. the weighted loss) in the same
    round trip; returns the summed floats.

    A parameter that received no gradient on any rank keeps `grad = None` (AdamW then skips it, as it would
    in a single process); one that received a gradient somewhere gets the sum (zeros for the ranks without).
    The caller weights each micro-batch's loss by its share of the global batch, so the sum is the gradient
    of the global-batch mean loss.
    """
    device = params[0].device
    groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in params] + list(extra), dtype=torch.float64,
                         device=device)
    handles = [dist.all_reduce(flags, async_op=True)]
    flats = {}
    for dtype, group in groups.items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        handles.append(dist.all_reduce(flat, async_op=True))
        flats[dtype] = flat
    for h in handles:
        h.wait()
    present = flags[: len(params)].tolist()
    has = {id(p): present[i] > 0 for i, p in enumerate(params)}
    for dtype, group in groups.items():
        offset = 0
        for p in group:
            n = p.numel()
            if has[id(p)]:
                p.grad = flats[dtype][offset:offset + n].view_as(p)
            else:
                p.grad = None
            offset += n
    return flags[len(params):].tolist()


# ------------------------------------------------------------------------------------------------ batch split
def split_batch(batch_size: int, pieces: int) -> list[tuple[int, int]]:
    """[lo, hi) of each of `pieces` contiguous micro-batches of a batch (sizes differ by at most one; a batch
    smaller than `pieces` leaves the last ones empty)."""
    sizes = [batch_size // pieces + (1 if m < batch_size % pieces else 0) for m in range(pieces)]
    out, lo = [], 0
    for size in sizes:
        out.append((lo, lo + size))
        lo += size
    return out


def my_pieces(pieces: int, env: DistEnv) -> range:
    """The contiguous block of micro-batch numbers this rank computes (empty when there are fewer micro-batches
    than ranks)."""
    return range(env.rank * pieces // env.world_size, (env.rank + 1) * pieces // env.world_size)


def piece_seed(seed: int, stage: str, step: int, piece: int, pieces: int) -> int:
    """Torch seed of micro-batch `piece` of step `step`. One micro-batch: the single-process trainer's seed, so
    that path is unchanged bit for bit."""
    if pieces == 1:
        return step_seed(seed, stage, step)
    return step_seed(seed, stage, step, salt=_PIECE_SALT + piece)


def val_piece_seed(seed: int, stage: str, batch: int, piece: int, pieces: int) -> int:
    """Torch seed of micro-batch `piece` of validation batch `batch` (see `piece_seed`)."""
    if pieces == 1:
        return step_seed(seed, stage, batch, salt=13)
    return step_seed(seed, stage, batch, salt=_VAL_PIECE_SALT + piece)
