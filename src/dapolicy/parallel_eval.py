"""Evaluation episodes spread over worker processes (`dap eval --workers N`).

On a CPU the simulator's stepping and rendering, not the policy, take most of an evaluation (about three
quarters on the quickstart task), and they run on one core. N workers run N episodes at once. Each worker is
spawned (no forked OpenMP or GL state), loads the model from its folder, builds its own environment and warms
the sampler up once, then takes episodes one at a time from the pool's queue, so short (successful) episodes
never leave a worker idle. Episode i is seeded by i alone (`evaluate.run_one_episode`), so the records equal a
one-process run's at the same torch thread count. Chunk latency is timed inside the workers: with more workers
than free cores it reads higher than one process's (`dap bench latency` is the speed reference).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapolicy.evaluate import EnvFactory, EpisodePlan, Rollouts, run_one_episode, summarize_latencies


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to rebuild the evaluation on its own: the saved model, the env, the sampling."""

    model_dir: str
    device: str | None
    threads: int
    env_factory: EnvFactory
    env_name: str
    ood: str
    mode: str | None
    steps: int | None
    plan: EpisodePlan


_WORKER: dict[str, Any] = {}  # per worker process: the controller and env, built by its first episode


def _worker_state(setup: WorkerSetup) -> dict[str, Any]:
    """Built on the first episode (not in a pool initializer, whose errors surface only as a broken pool)."""
    if not _WORKER:
        import torch

        from dapolicy.envs.perturbations import OODConfig
        from dapolicy.evaluate import RecedingHorizonController, load_policy

        torch.set_num_threads(setup.threads)
        policy = load_policy(setup.model_dir, setup.device)
        ood = OODConfig.parse(setup.ood)
        env = ood.wrap(setup.env_factory(setup.env_name, image_size=policy.spec.image_size,
                                         cameras=tuple(policy.spec.cameras), ood=ood.for_env()))
        controller = RecedingHorizonController(policy, policy.spec, mode=setup.mode, steps=setup.steps)
        controller.warm_up(env.reset(setup.plan.seed),
                           want_next=controller.can_predict_next and setup.plan.videos > 0)
        _WORKER.update(controller=controller, env=env, spec=policy.spec)
    return _WORKER


def _episode(setup: WorkerSetup, i: int) -> tuple[dict[str, Any], str | None, list[tuple[float, bool]]]:
    state = _worker_state(setup)
    controller = state["controller"]
    controller.latencies.clear()
    record, video = run_one_episode(controller, state["env"], state["spec"], i, setup.plan)
    return record, video, list(controller.latencies)


def run_episodes_in_workers(setup: WorkerSetup, episodes: int, workers: int, progress: bool = True,
                            desc: str = "eval") -> Rollouts:
    """Episodes 0..episodes-1 over `workers` spawned processes; records in episode order."""
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1 (--workers), got {workers}")
    records: list[dict[str, Any]] = []
    videos: list[str] = []
    latencies: list[tuple[float, bool]] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, episodes), mp_context=context) as pool:
        futures = [pool.submit(_episode, setup, i) for i in range(episodes)]
        bar = tqdm(as_completed(futures), total=episodes, desc=desc, disable=not progress, unit="ep")
        for future in bar:
            record, video, chunk_ms = future.result()
            records.append(record)
            videos += [video] if video else []
            latencies += chunk_ms
            bar.set_postfix(success=f"{sum(r['success'] for r in records)}/{len(records)}")
    records.sort(key=lambda r: r["episode"])
    latency, includes_decode = summarize_latencies(latencies)
    return Rollouts(records, latency, includes_decode, sorted(videos, key=lambda v: Path(v).name))
