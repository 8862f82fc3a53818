"""`dap bench`: inference latency and training throughput, measured so that comparisons are honest.

    dap bench latency [--config small] [--device cpu] [--batch 1,8] [--steps 1,2,5,10] [--json FILE]
        per-chunk latency (p50/p90 ms, warm-up excluded) of every registered method at random weights of one
        named size on a Meta-World-shaped task: DAP in every coupling mode, FM built separately (the same
        policy without dynamics), the baselines in each of their generation modes (DDPM at its full T steps).
    dap bench train [--config small] [--json FILE]
        samples/s of every method's training step (forward + backward + AdamW) per stage on synthetic batches.
    dap bench modes RUN   (or `dap bench RUN`)
        a trained model's coupling modes as ratios to mode "off".

The machine is shared and noisy, so everything one command compares is timed interleaved in one process
(round-robin over all cases, in a shuffled order every round): machine noise then hits every case alike and
ratios stay meaningful even when absolute times drift. The project's target is coupled (Jacobi) DAP <= 1.3x
FM at the same K; the JSON holds that ratio per K.

Latency protocol (`--protocol`): by default ("warm") every timed chunk comes right after an untimed chunk of
the same case, as when one policy runs chunk after chunk. With "cold" it comes right after whatever case the
shuffle put before it, and so also pays for that case's leftovers: its weights in the caches instead of this
one's, and on a CPU (the likely cause of most of it) its OpenMP threads still spinning on the cores, where a
Jacobi DAP chunk's dynamics worker needs one. Both are back-to-back figures, the best case: a robot's process
idles between chunks, and `--idle-ms` measures what that costs on a given machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

SUBMODES = ("latency", "train", "modes")


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Case:
    """One timed thing: `run()` does one unit of work (a chunk, a training step); labels describe it."""

    labels: dict[str, Any]
    run: Callable[[], Any]


PROTOCOLS = ("warm", "cold")


def time_interleaved(cases: list[Case], reps: int, warmup: int = 3, seed: int = 0,
                     sync: Callable[[], None] | None = None, protocol: str = "warm",
                     idle_ms: float = 0.0) -> list[list[float]]:
    """Milliseconds of `reps` runs of every case, round-robin in a fresh shuffled order each round.

    Warm-up runs (excluded) come first: lazy initialisation, tracing and allocator growth happen there.
    protocol "cold": each timed run follows whatever case the shuffle put before it, so it also pays for that
    case's leftovers (its weights in the caches instead of this one's, its OpenMP threads still spinning on
    the cores). "warm": each timed run follows an untimed run of the same case, as a chunk follows a chunk
    of the same policy on a robot; the interleaving (and so the fairness under drift) is the same.
    idle_ms: sleep this long right before every timed run, as a robot's process idles while a chunk is
    executed (on a shared machine the caches and idle cores cool down meanwhile).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown timing protocol {protocol!r} (protocols: {', '.join(PROTOCOLS)})")
    sync = sync or (lambda: None)
    for case in cases:
        for _ in range(warmup):
            case.run()
    sync()
    times: list[list[float]] = [[] for _ in cases]
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        for i in rng.permutation(len(cases)):
            if protocol == "warm":
                cases[i].run()
                sync()
            if idle_ms > 0:
                time.sleep(idle_ms / 1e3)
            t0 = time.perf_counter()
            cases[i].run()
            sync()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def latency_stats(ms: list[float]) -> dict[str, float]:
    """p50 / p90 / mean / min of per-chunk times in ms, and their count: the summary every latency table uses."""
    return {"p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(np.mean(ms)),
            "min_ms": float(np.min(ms)), "n": len(ms)}


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on (load averages: the machine is shared)."""
    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "processor": platform.processor() or platform.machine()}
    if hasattr(os, "getloadavg"):
        info["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def random_obs(policy: Any, batch: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded batch of observations (uint8 frames, Gaussian proprio) in `policy`'s shapes, for timing."""
    rng = np.random.default_rng(seed)
    spec, t = policy.spec, policy.n_obs_steps
    return {"images": rng.integers(0, 256, (batch, t, len(spec.cameras), spec.image_size, spec.image_size, 3),
                                   dtype=np.uint8),
            "proprio": rng.normal(size=(batch, t, spec.proprio_dim)).astype(np.float32)}


def _sync_fn(device: str) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.startswith("cuda") else None


# ---------------------------------------------------------------------------------------------- latency
def latency_cases(policies: dict[str, Any], batches: list[int], steps: list[int], threads: list[int] | None = None,
                  reference: bool = False) -> list[Case]:
    """One case per (method, generation mode, K, batch, torch threads); DDPM modes at their full T steps.

    threads: torch intra-op thread counts to time every case at (None = torch's current setting).
    reference: also time DAP (Jacobi) and FM through the reference sampler (`fast_sampler.reference_predict`,
    the plain `forward` calls wired into `coupling.coupled_generation`), for before/after comparisons.
    """
    cases: list[Case] = []
    for t in threads or [torch.get_num_threads()]:
        for b in batches:
            for name, policy in policies.items():
                obs = random_obs(policy, b, seed=b)
                for mode in policy.capabilities.modes or (None,):
                    if mode == "ddpm":  # ancestral sampling runs all T steps, not a K of the sweep
                        k = int(getattr(getattr(policy.config, "diffusion", None), "train_steps", 100))
                        cases.append(_chunk_case(policy, name, mode, k, b, t, obs))
                        continue
                    for k in steps:
                        cases.append(_chunk_case(policy, name, mode, k, b, t, obs))
                if reference and name in ("dap", "fm"):
                    for k in steps:
                        cases.append(_reference_case(policy, name, k, b, t, obs))
    return cases


def _chunk_case(policy: Any, name: str, mode: str | None, k: int, b: int, threads: int, obs: dict) -> Case:
    def run() -> Any:
        torch.set_num_threads(threads)
        return policy.predict_chunk(obs, mode=mode, steps=k)

    return Case({"method": name, "mode": mode or "default", "steps": k, "batch": b, "threads": threads}, run)


def _reference_case(policy: Any, name: str, k: int, b: int, threads: int, obs: dict) -> Case:
    from dapolicy.policies.fast_sampler import reference_predict

    mode = "jacobi" if name == "dap" else "off"

    def run() -> Any:
        torch.set_num_threads(threads)
        policy.eval()
        a, _, _ = reference_predict(policy, policy.validate_obs(obs), False, mode, k, False, None)
        return policy.action_normalizer.unnormalize(a).cpu().numpy()

    return Case({"method": f"{name}-reference", "mode": mode, "steps": k, "batch": b, "threads": threads}, run)


def build_policies(size: str, device: str, methods: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Every registered method (or `methods`) at random weights of `size`, on a Meta-World-shaped task."""
    from dapolicy.info import default_spec
    from dapolicy.policies.registry import make_policy, method_names

    spec = default_spec()
    out = {}
    for name in methods or method_names():
        torch.manual_seed(seed)
        out[name] = make_policy(name, spec, size=size).to(device).eval()
    return out


def bench_latency(size: str = "small", device: str = "cpu", batches: list[int] | None = None,
                  steps: list[int] | None = None, reps: int = 20, methods: list[str] | None = None,
                  threads: list[int] | None = None, reference: bool = False, warmup: int = 3,
                  protocol: str = "warm", idle_ms: float = 0.0) -> dict[str, Any]:
    """Per-chunk latency of every method and mode, timed interleaved (`time_interleaved`'s `protocol`); see
    the module docstring."""
    batches = batches or [1, 8]
    steps = steps or [1, 2, 5, 10]
    threads = threads or [torch.get_num_threads()]
    restore = torch.get_num_threads()
    info = machine_info(device)
    policies = build_policies(size, device, methods)
    cases = latency_cases(policies, batches, steps, threads, reference)
    try:
        times = time_interleaved(cases, reps, warmup=warmup, sync=_sync_fn(device), protocol=protocol,
                                 idle_ms=idle_ms)
    finally:
        torch.set_num_threads(restore)
    results = [{**c.labels, **latency_stats(t)} for c, t in zip(cases, times)]
    from dapolicy.policies.fast_sampler import get_options

    return {"kind": "latency", "config": size, "reps": reps, "protocol": protocol, "idle_ms": idle_ms,
            "batches": batches, "steps": steps, "threads": threads,
            "sampler": dataclasses.asdict(get_options(None)),
            "matmul_precision": torch.get_float32_matmul_precision(), "machine": info,
            "load_avg_after": machine_info(device).get("load_avg_1_5_15"),
            "results": results, "per_k": dap_over_fm(results, steps, batches, threads)}


def _p50(results: list[dict], method: str, mode: str, k: int, b: int, threads: list[int]) -> tuple[float, int] | None:
    """(best p50 over the thread settings, its thread count) of one case, or None when it was not timed."""
    found = [(r["p50_ms"], r["threads"]) for r in results
             if (r["method"], r["mode"], r["steps"], r["batch"]) == (method, mode, k, b) and r["threads"] in threads]
    return min(found) if found else None


def dap_over_fm(results: list[dict], steps: list[int], batches: list[int], threads: list[int]) -> dict[str, Any]:
    """Per K: Jacobi DAP p50 / FM p50, each at its fastest thread setting (honest: FM gets its best too).

    Top level: the first batch size; "by_batch": every batch; "by_threads": per torch thread setting.
    """
    def entry(k: int, b: int, ts: list[int]) -> dict[str, Any]:
        dap, fm = _p50(results, "dap", "jacobi", k, b, ts), _p50(results, "fm", "default", k, b, ts)
        return {"dap_p50_ms": dap[0] if dap else None, "fm_p50_ms": fm[0] if fm else None,
                "ratio_dap_over_fm": dap[0] / fm[0] if dap and fm else None,
                "dap_threads": dap[1] if dap else None, "fm_threads": fm[1] if fm else None}

    out: dict[str, Any] = {}
    for k in steps:
        by_batch = {str(b): entry(k, b, threads) for b in batches}
        by_threads = {str(t): {str(b): entry(k, b, [t]) for b in batches} for t in threads}
        out[str(k)] = {**by_batch[str(batches[0])], "batch": batches[0], "by_batch": by_batch,
                       "by_threads": by_threads}
    return out


def print_latency(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"# dap bench latency: config {report['config']}, {m['device']}, torch threads {report['threads']}, "
          f"{report['reps']} interleaved chunks per case ({report.get('protocol', 'cold')}), "
          f"load before {m.get('load_avg_1_5_15')} "
          f"after {report.get('load_avg_after')}")
    print(f"# fast sampler {report['sampler']}, float32 matmul precision {report.get('matmul_precision')}")
    for t in report["threads"]:
        for b in report["batches"]:
            rows: dict[tuple[str, str], dict[int, dict]] = {}
            for r in report["results"]:
                if r["batch"] == b and r["threads"] == t:
                    rows.setdefault((r["method"], r["mode"]), {})[r["steps"]] = r
            ks = sorted({k for row in rows.values() for k in row})
            print(f"\nbatch {b}, {t} thread(s): p50 / p90 ms per chunk")
            print("| method | mode | " + " | ".join(f"K={k}" for k in ks) + " |")
            print("|---|---|" + "---|" * len(ks))
            for (method, mode), row in rows.items():
                cells = [f"{row[k]['p50_ms']:.1f} / {row[k]['p90_ms']:.1f}" if k in row else "" for k in ks]
                print(f"| {method} | {mode} | " + " | ".join(cells) + " |")
    print("\nJacobi DAP over FM (p50, each at its fastest thread setting):")
    for k, r in report["per_k"].items():
        if r["ratio_dap_over_fm"] is None:
            print(f"  K={k}: n/a")
            continue
        print(f"  K={k}: DAP {r['dap_p50_ms']:.1f} ms ({r['dap_threads']} thr), FM {r['fm_p50_ms']:.1f} ms "
              f"({r['fm_threads']} thr), ratio {r['ratio_dap_over_fm']:.2f} (batch {r['batch']})")


# ---------------------------------------------------------------------------------------------- training
def synthetic_batch(policy: Any, stage: str, batch_size: int, seed: int = 0,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A random batch in the layout stage `stage` trains on (its `StageSpec`; docs/architecture.md)."""
    spec, stage_spec = policy.spec, policy.stage_spec(stage)
    g = torch.Generator().manual_seed(seed)
    c, s, t, h = len(spec.cameras), spec.image_size, policy.n_obs_steps, policy.horizon

    def images(*lead: int) -> torch.Tensor:
        return torch.randint(0, 256, (*lead, c, s, s, 3), generator=g, dtype=torch.uint8)

    if stage_spec.layout == "frames":
        return {"images": images(batch_size).to(device)}
    batch = {"proprio": torch.randn(batch_size, t, spec.proprio_dim, generator=g),
             "action": torch.rand(batch_size, h, spec.action_dim, generator=g) * 2 - 1,
             "action_is_pad": torch.zeros(batch_size, h, dtype=torch.bool)}
    if "images" in stage_spec.inputs:
        batch["images"], batch["next_images"] = images(batch_size, t), images(batch_size)
    if "latents" in stage_spec.inputs:
        shape = tuple(policy.encode_latents(images(1).to(policy.device)).shape[2:])  # [c, h, w] of the codec
        batch["latents"] = torch.randn(batch_size, t, c, *shape, generator=g)
        batch["next_latents"] = torch.randn(batch_size, c, *shape, generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def _train_case(policy: Any, name: str, stage: str, batch_size: int, device: str) -> Case:
    """One optimizer step of `stage` as the trainer does it: frozen rest in eval mode, AdamW, grad clipping."""
    from dapolicy.training.config import TrainConfig

    cfg = TrainConfig()
    module = policy.stage_module(stage)
    preset = policy.stage_preset(stage)
    params = [p for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=preset.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    batch = synthetic_batch(policy, stage, batch_size, device=device)
    step = [0]

    def run() -> float:
        policy.requires_grad_(False)
        module.requires_grad_(True)
        policy.eval()
        module.train()
        torch.manual_seed(step[0])
        step[0] += 1
        loss = policy.compute_loss(batch, stage)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        return float(loss.detach())

    return Case({"method": name, "stage": stage, "batch_size": batch_size}, run)


def bench_train(size: str = "small", device: str = "cpu", reps: int = 5, methods: list[str] | None = None,
                warmup: int = 1) -> dict[str, Any]:
    """samples/s of every method's training step per stage at its preset batch size, timed interleaved.

    A stage's steps change only its own module (with its own optimizer), so one policy serves all its stages.
    """
    info = machine_info(device)
    cases = []
    for name, policy in build_policies(size, device, methods).items():
        for stage in policy.stage_names:
            cases.append(_train_case(policy, name, stage, policy.stage_preset(stage).batch_size, device))
    # training steps are throughput, not a control loop's latency: back to back, the cheaper cold order
    times = time_interleaved(cases, reps, warmup=warmup, sync=_sync_fn(device), protocol="cold")
    results = []
    for case, ms in zip(cases, times):
        st = latency_stats(ms)
        results.append({**case.labels, **st, "samples_per_s": case.labels["batch_size"] / (st["p50_ms"] / 1e3)})
    return {"kind": "train", "config": size, "reps": reps, "machine": info,
            "load_avg_after": machine_info(device).get("load_avg_1_5_15"), "results": results}


def print_train(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"# dap bench train: config {report['config']}, {m['device']}, {m['threads']} thread(s), "
          f"{report['reps']} interleaved steps per case, load before {m.get('load_avg_1_5_15')} "
          f"after {report.get('load_avg_after')}")
    print("| method | stage | batch | ms / step (p50) | samples/s |\n|---|---|---|---|---|")
    for r in report["results"]:
        print(f"| {r['method']} | {r['stage']} | {r['batch_size']} | {r['p50_ms']:.0f} | {r['samples_per_s']:.1f} |")


# ---------------------------------------------------------------------------------------------- modes of a run
def bench_modes(policy: Any, reps: int = 30, steps: int | None = None,
                modes: tuple[str, ...] | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Median/p90 ms per chunk for each mode on a random batch-1 observation; ratios to mode "off"."""
    modes = modes if modes is not None else policy.capabilities.modes
    if not modes:
        raise ValueError(f"method {policy.method!r} has no coupling modes to compare")
    obs = random_obs(policy, 1, seed)
    cases = [Case({"mode": m}, (lambda m=m: policy.predict_chunk(obs, mode=m, steps=steps))) for m in modes]
    times = dict(zip(modes, time_interleaved(cases, reps, warmup=3, seed=seed)))
    base = float(np.median(times["off"])) if "off" in times else None
    return {m: {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                "ratio_to_off": (float(np.median(t)) / base) if base else float("nan")}
            for m, t in times.items()}


def _run_modes(args: argparse.Namespace) -> int:
    from dapolicy.evaluate import load_policy

    if not args.run:
        raise ValueError("modes needs a run folder (with model/) or a saved model folder: dap bench modes RUN")
    policy = load_policy(args.run, args.device)
    reps = args.reps or 30
    result = bench_modes(policy, reps=reps, steps=args.flow_steps)
    k = args.flow_steps or policy.config.flow.steps
    print(f"batch 1, K={k}, {torch.get_num_threads()} thread(s), {reps} chunks per mode (interleaved)")
    print("| mode | p50 ms | p90 ms | p50 / off |\n|---|---|---|---|")
    for mode, r in result.items():
        print(f"| {mode} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['ratio_to_off']:.2f}x |")
    if args.json:
        _write_json(args.json, {"kind": "modes", "run": str(args.run), "steps": k, "reps": reps,
                                "machine": machine_info(args.device), "results": result})
    return 0


# ---------------------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _write_json(path: str, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def configure_parser(p: argparse.ArgumentParser) -> None:
    from dapolicy.policies.registry import SIZES

    p.add_argument("what", metavar="latency|train|modes|RUN",
                   help="latency / train (random weights, every method), modes RUN (a trained model's coupling "
                        "modes); a bare RUN means modes RUN")
    p.add_argument("run", nargs="?", default=None, help="for modes: run folder (with model/) or model folder")
    from dapolicy.cli_options import add_device, add_matmul_precision, add_out, add_sampler, positive_int

    p.add_argument("--config", default="small", choices=SIZES, help="named size for latency/train (default small)")
    add_device(p, "the models run")
    p.add_argument("--batch", type=_int_list, default=[1, 8], help="latency batch sizes (default 1,8)")
    p.add_argument("--steps", type=_int_list, default=[1, 2, 5, 10], help="latency sampling steps K (default 1,2,5,10)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: every registered method)")
    p.add_argument("--reps", type=positive_int, default=None,
                   help="timed runs per case (default: latency 20, train 5, modes 30)")
    p.add_argument("--threads", type=_int_list, default=None, metavar="N[,N...]",
                   help="torch CPU threads; latency takes a list (e.g. 1,2) and times every case at each "
                        "(default: torch's)")
    p.add_argument("--reference", action="store_true",
                   help="latency: also time DAP (Jacobi) and FM through the reference sampler (before/after)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="warm",
                   help="latency: warm (default) = every timed chunk right after an untimed chunk of the same "
                        "case, as on a robot running one policy; cold = right after whatever case came before "
                        "(pays for its cache footprint and spinning OpenMP threads). Both interleave every "
                        "case in a shuffled order")
    p.add_argument("--idle-ms", type=float, default=0.0, metavar="MS",
                   help="latency: sleep MS before every timed chunk, like a robot's process between chunks "
                        "(default 0: back to back)")
    p.add_argument("--flow-steps", type=positive_int, default=None, help="modes: K (default: the model's)")
    add_sampler(p)
    add_matmul_precision(p)  # recorded in the JSON
    add_out(p, "also write every figure to this JSON file (--json: the older spelling)", "--json", dest="json")


def run(args: argparse.Namespace) -> int:
    from dapolicy.cli_options import resolve_device

    args.device = resolve_device(args.device)
    if args.reps is not None and args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    if args.idle_ms < 0:
        raise ValueError(f"--idle-ms must be >= 0, got {args.idle_ms}")
    if args.threads:
        torch.set_num_threads(args.threads[0])
    from dapolicy.cli_options import apply_matmul_precision, apply_sampler

    apply_sampler(args.sampler)
    apply_matmul_precision(args.matmul_precision)
    if args.what not in SUBMODES:  # `dap bench RUN`: the original behaviour
        if args.run is not None:
            raise ValueError(f"unknown bench mode {args.what!r} (latency, train, modes RUN, or a bare RUN)")
        args.run, args.what = args.what, "modes"
    if args.what == "modes":
        return _run_modes(args)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    if args.what == "latency":
        report = bench_latency(args.config, args.device, args.batch, args.steps, args.reps or 20, methods,
                               args.threads, args.reference, protocol=args.protocol,
                               idle_ms=args.idle_ms)
        print_latency(report)
    else:
        report = bench_train(args.config, args.device, args.reps or 5, methods)
        print_train(report)
    if args.json:
        _write_json(args.json, report)
    return 0
