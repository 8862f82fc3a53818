"""`dap eval`: seeded closed-loop evaluation of a trained policy, in distribution or out of distribution.

Protocol (DESIGN §3): episode i uses env seed `seed + i` (default seed 100000, disjoint from the collection
seeds), so every method meets the same start states and the same OOD draws. The policy is driven with a
receding horizon exactly as `select_action` would (T_o-frame history, a queue of T_a actions), but the
evaluator calls `predict_chunk` itself, because only there can it

* time each chunk on its own (per-chunk latency p50/p90, after one untimed warm-up call), and
* ask a DAP policy for its predicted next frames, which the videos show under the real frames.

Results go to `RUN/eval/<name>.json` (success rate with a 95% Wilson interval, PushT-style score, per-episode
records, latency, settings) and videos of the first episodes to `RUN/eval/videos/`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dapolicy.envs.base import Env, make_env
from dapolicy.envs.perturbations import OOD_KINDS, OODConfig
from dapolicy.policies.registry import MODEL_SUBDIR, resolve_model_dir
from dapolicy.receding import RecedingHorizon, env_frame
from dapolicy.spec import EnvSpec
from dapolicy.stats import latency_summary, wilson_interval

DEFAULT_SEED = 100_000  # test episodes: the numbers reported
VALIDATION_SEED = 300_000  # validation episodes: for choices (budgets, K, OOD strengths), docs/benchmark.md
OOD_SUITE: tuple[str, ...] = ("none", *OOD_KINDS)

EnvFactory = Callable[..., Env]


# ----------------------------------------------------------------------------------------------- policy access
def default_output_dir(path: str | Path, subdir: str) -> Path:
    """Where results of `path` go: RUN/<subdir> for a run folder; next to a model folder otherwise.

    A model folder is never written into, so it stays a clean artefact that can be copied or served.
    """
    path = Path(path)
    if (path / MODEL_SUBDIR).is_dir():
        return path / subdir
    return path.parent / subdir


def resolve_device(device: str | None) -> str:
    """'auto' (or None) -> 'cuda' when a GPU is visible, else 'cpu'; a CUDA device without a GPU is an error."""
    from dapolicy.cli_options import resolve_device as resolve

    return resolve(device)


def load_policy(path: str | Path, device: str | None = "cpu") -> Any:
    """Load the saved policy of a run (or model folder), any method, in eval mode on `device`.

    A run folder whose later stages never trained is refused (`check_run_finished`): its model/ holds
    untrained parts, and every command that loads a policy goes through here.
    """
    from dapolicy.policies.registry import check_run_finished, load_pretrained

    map_location = resolve_device(device)
    check_run_finished(path)
    return load_pretrained(path, map_location=map_location).eval()


@dataclass(frozen=True)
class ChunkDims:
    """The receding-horizon sizes the evaluator needs: T_o, H, T_a and the next-observation offset k."""

    n_obs_steps: int
    horizon: int
    n_action_steps: int
    next_obs_offset: int

    @classmethod
    def of(cls, policy: Any) -> "ChunkDims":
        return cls(policy.n_obs_steps, policy.horizon, policy.n_action_steps, policy.next_obs_offset)


def check_mode(policy: Any, mode: str | None) -> None:
    """A clear error when `mode` is not one of the method's generation modes (DAP: its coupling modes)."""
    modes = policy.capabilities.modes
    if mode is not None and mode not in modes:
        raise ValueError(f"method {policy.method!r} has no generation mode {mode!r}"
                         + (f" (modes: {', '.join(modes)})" if modes else " (it has a single way to sample)"))


def _sync_device() -> None:
    """Wait for queued GPU work so a timer measures the computation, not its dispatch."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- controller
class RecedingHorizonController:
    """Runs a policy in closed loop with `select_action`'s semantics, calling `predict_chunk` directly.

    Keeps the last T_o observations (the first frame of an episode repeated, as the training sampler pads)
    and a queue of T_a actions; a new chunk is predicted only when the queue is empty.
    """

    def __init__(self, policy: Any, spec: EnvSpec, mode: str | None = None,
                 steps: int | None = None) -> None:
        self.policy = policy
        self.spec = spec
        self.dims = ChunkDims.of(policy)
        self.mode = mode
        self.steps = steps
        self.can_predict_next = policy.capabilities.predicts_next_obs and mode != "off"
        self.latencies: list[tuple[float, bool]] = []  # (ms, included next-frame decoding)
        self.last_next_frames: np.ndarray | None = None  # uint8 [C, S, S, 3] from the last re-plan
        self.reset()

    def reset(self) -> None:
        """Forget the history and the queued actions (start of an episode)."""
        self._loop = RecedingHorizon(self.dims.n_obs_steps, self.dims.n_action_steps)
        self.last_next_frames = None

    def batch(self) -> dict[str, np.ndarray]:
        """The policy input for the current history: images [1,T_o,C,S,S,3], proprio [1,T_o,P]."""
        return self._loop.batch()

    def predict(self, want_next: bool = False, timed: bool = True) -> np.ndarray:
        """One chunk for the current history -> actions [H, A]; optionally records the predicted frames."""
        import torch

        want_next = want_next and self.can_predict_next
        kwargs: dict[str, Any] = {}
        if self.mode is not None:
            kwargs["mode"] = self.mode
        if self.steps is not None:
            kwargs["steps"] = self.steps
        obs = self.batch()
        _sync_device()
        start = time.perf_counter()
        with torch.no_grad():
            pred = self.policy.predict_chunk(obs, return_next=want_next, **kwargs)
        actions, next_frames = pred.actions, pred.next_frames
        _sync_device()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if timed:
            self.latencies.append((elapsed_ms, want_next))
        if next_frames is not None:
            self.last_next_frames = next_frames[0]
        return actions[0]

    def act(self, env_obs: dict[str, Any], want_next: bool = False) -> np.ndarray:
        """The action for this step: pops the queue, re-planning first when it is empty."""
        self._loop.observe(env_frame(env_obs, self.spec))
        if self._loop.needs_chunk:
            self._loop.enqueue(self.predict(want_next=want_next))
        return self._loop.pop()

    def warm_up(self, env_obs: dict[str, Any], want_next: bool) -> None:
        """One untimed call: first calls pay for lazy initialisation and allocator growth."""
        self._loop.observe(env_frame(env_obs, self.spec))
        self.predict(want_next=want_next, timed=False)
        self.reset()

    def latency_report(self) -> tuple[dict[str, Any], bool]:
        """Per-chunk latency summary; excludes chunks that also decoded frames for videos when others exist.

        Decoding the predicted frames is only for the videos and is not needed to act, so it would bias
        the latency. Returns (summary, whether the summary includes decoding).
        """
        return summarize_latencies(self.latencies)


def summarize_latencies(latencies: Sequence[tuple[float, bool]]) -> tuple[dict[str, Any], bool]:
    """(summary, includes decoding) of (ms, decoded next frames) pairs: chunks that decoded frames for the
    videos are left out when there are others (decoding is not needed to act)."""
    plain = [ms for ms, dec in latencies if not dec]
    if plain:
        return latency_summary(plain), False
    return latency_summary([ms for ms, _ in latencies]), bool(latencies)


# ----------------------------------------------------------------------------------------------- evaluation
def normalize_ood(kind: str) -> str:
    """Canonical --ood value: "all", or "kind" / "kind:strength" as `OODConfig.parse` reads it (the one parser;
    it also accepts the CLI spelling `novel-object` and the blind control, which "all" leaves out)."""
    if isinstance(kind, str) and kind.strip().lower() == "all":
        return "all"
    return OODConfig.parse(kind).spec


def _ood_argument(value: str) -> str:
    """argparse type for --ood: a bad value is a usage error naming the problem."""
    try:
        return normalize_ood(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def result_name(ood: str, mode: str | None = None, steps: int | None = None) -> str:
    """File stem of a result: the OOD kind, plus the coupling mode and flow steps when they were set."""
    name = ood
    if mode is not None:
        name += f"_{mode}"
    if steps is not None:
        name += f"_k{steps}"
    return name


def _episode_frame(obs: dict[str, Any], cameras: Sequence[str], predicted: np.ndarray | None,
                   show_prediction: bool, offset: int, step: int) -> np.ndarray:
    from dapolicy.video import compose_frame

    real = [np.asarray(obs["images"][c]) for c in cameras]
    pred = None
    if show_prediction:
        # Before the first prediction exists, a black row keeps every frame the same size.
        pred = list(predicted) if predicted is not None else [np.zeros_like(r) for r in real]
    return compose_frame(real, pred, real_label=f"real t={step}",
                         predicted_label=f"predicted o(t+{offset})")


@dataclass(frozen=True)
class Parallelism:
    """Episodes side by side: `workers` processes with `threads` torch threads each (1 = in this process)."""

    workers: int = 1
    threads: int = 1


@dataclass
class Rollouts:
    """What `run_episodes` measured: per-episode records, per-chunk latency, written videos."""

    episodes: list[dict[str, Any]]
    latency_ms: dict[str, Any]
    latency_includes_decode: bool
    videos: list[str]


@dataclass(frozen=True)
class EpisodePlan:
    """What every episode of one suite shares: seeds, limits, sampling settings and where videos go."""

    seed: int
    max_steps: int
    videos: int = 0
    video_dir: Path | None = None
    video_prefix: str = "episode"


def run_one_episode(controller: RecedingHorizonController, env: Env, spec: EnvSpec, i: int,
                    plan: EpisodePlan) -> tuple[dict[str, Any], str | None]:
    """Episode i (env seed `plan.seed + i`) -> (its record, its video path or None)."""
    import torch

    from dapolicy.video import video_suffix, write_video

    ep_seed = plan.seed + i
    # Seed the policy's sampling noise per episode: results do not depend on episode order or process.
    torch.manual_seed(ep_seed)
    np.random.seed(ep_seed % 2**32)
    record_video = i < plan.videos and plan.video_dir is not None
    show_prediction = controller.can_predict_next
    controller.reset()
    obs = env.reset(ep_seed)
    frames: list[np.ndarray] = []
    success, score, n_steps = False, 0.0, 0
    for _ in range(plan.max_steps):
        action = controller.act(obs, want_next=record_video)
        if record_video:
            frames.append(_episode_frame(obs, spec.cameras, controller.last_next_frames, show_prediction,
                                         controller.dims.next_obs_offset, n_steps))
        obs, result = env.step(action)
        n_steps += 1
        score = max(score, float(result.score))
        success = success or bool(result.success)
        if success or result.done:
            break
    path = None
    if record_video:
        frames.append(_episode_frame(obs, spec.cameras, controller.last_next_frames, show_prediction,
                                     controller.dims.next_obs_offset, n_steps))
        path = str(write_video(frames, plan.video_dir / f"{plan.video_prefix}_ep{i:03d}_seed{ep_seed}{video_suffix()}"))
    return {"episode": i, "seed": ep_seed, "success": success, "steps": n_steps, "score": score}, path


def run_episodes(policy: Any, env: Env, spec: EnvSpec, episodes: int, seed: int, max_steps: int,
                 mode: str | None = None, steps: int | None = None, videos: int = 0,
                 video_dir: Path | None = None, video_prefix: str = "episode",
                 progress: bool = True, desc: str = "eval") -> Rollouts:
    """Roll out `episodes` seeded episodes (env seed `seed + i`), writing videos of the first `videos`."""
    from tqdm.auto import tqdm

    plan = EpisodePlan(seed, max_steps, videos, video_dir, video_prefix)
    controller = RecedingHorizonController(policy, spec, mode=mode, steps=steps)
    controller.warm_up(env.reset(seed), want_next=controller.can_predict_next and videos > 0)
    records: list[dict[str, Any]] = []
    video_paths: list[str] = []
    bar = tqdm(range(episodes), desc=desc, disable=not progress, unit="ep")
    for i in bar:
        record, path = run_one_episode(controller, env, spec, i, plan)
        records.append(record)
        video_paths += [path] if path else []
        bar.set_postfix(success=f"{sum(r['success'] for r in records)}/{i + 1}")
    latency, includes_decode = controller.latency_report()
    return Rollouts(records, latency, includes_decode, video_paths)


def evaluate(run_dir: str | Path, episodes: int = 50, ood: str = "none", seed: int = DEFAULT_SEED,
             env: str | None = None, videos: int = 3, mode: str | None = None, flow_steps: int | None = None,
             max_steps: int | None = None, out_dir: str | Path | None = None, name: str | None = None,
             policy: Any = None, env_factory: EnvFactory | None = None, progress: bool = True,
             device: str | None = "cpu", threads: int | None = None, workers: int = 1) -> dict[str, Any]:
    """Evaluate the policy of `run_dir` (a run folder or a model folder) and write `<out_dir>/<name>.json`.

    threads: torch CPU threads while evaluating (None = torch's setting); restored afterwards.
    progress: tqdm bars per suite.

    ood: none | light | distractor | novel_object | blind | all, a perturbation optionally with a strength
        ("light:0.8", result name "light@0.8"; docs/ood.md); blind = grey images, a control for whether the
        task needs vision. all: none + the three perturbations, plus summary.json / summary.md; then the
        return value is {"suites": {kind: result}, "summary": [...]}.
    env: task name; default the one the model was trained on (`policy.spec.name`).
    mode / flow_steps: coupling mode and number of flow steps K; None = the policy's defaults.
    max_steps: episode length limit; default the task's `spec.max_steps`.
    policy: an already loaded policy (skips loading); env_factory: replaces `make_env` (tests).
    device: where a loaded policy runs ("cpu", "cuda", "auto").
    workers: processes that run episodes side by side (`parallel_eval`), each with `threads` (or 1) torch
        threads; the same records as one process. Needs a saved model (run_dir), not an in-memory `policy`.
    """
    from dapolicy.runtime import torch_threads

    ood = normalize_ood(ood)
    env_factory = env_factory or make_env
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1 (--episodes), got {episodes}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (--threads), got {threads}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (--workers), got {workers}")
    if workers > 1 and policy is not None:
        raise ValueError("workers > 1 loads the model from its folder in every worker: pass run_dir, not policy")
    parallel = Parallelism(workers, threads or 1)
    out = Path(out_dir) if out_dir is not None else default_output_dir(run_dir, "eval")
    with torch_threads(threads):
        if policy is None:
            policy = load_policy(run_dir, device)
        check_mode(policy, mode)
        if ood == "all":
            return _evaluate_all(run_dir, episodes, seed, env, videos, mode, flow_steps, max_steps, out, policy,
                                 env_factory, progress, parallel)
        return _evaluate_one(run_dir, episodes, ood, seed, env, videos, mode, flow_steps, max_steps, out, name,
                             policy, env_factory, progress, parallel=parallel)


def _evaluate_one(run_dir: str | Path, episodes: int, ood: str, seed: int, env: str | None, videos: int,
                  mode: str | None, flow_steps: int | None, max_steps: int | None, out: Path, name: str | None,
                  policy: Any, env_factory: EnvFactory, progress: bool, note_env: bool = True,
                  parallel: Parallelism = Parallelism()) -> dict[str, Any]:
    """One suite of `evaluate` (its arguments checked, the policy loaded); note_env: say so when the env is
    another task than the model's (once per command, not once per suite)."""

    from dapolicy.atomic import write_json_atomic

    spec: EnvSpec = policy.spec
    env_name = env or spec.name
    ood_config = OODConfig.parse(ood)
    name = name or result_name(ood_config.label, mode, flow_steps)
    # blind: the env renders as in distribution and the wrapper greys the images the policy sees
    environment = ood_config.wrap(env_factory(env_name, image_size=spec.image_size, cameras=tuple(spec.cameras),
                                              ood=ood_config.for_env()))
    try:
        _check_env(environment.spec, spec)
        if environment.spec.name != spec.name and note_env:
            _note(f"the model was trained on {spec.name!r}; evaluating it on {environment.spec.name!r}, which has "
                  f"the same observation and action shapes")
        if max_steps is not None and max_steps > environment.spec.max_steps:
            raise ValueError(f"max_steps {max_steps} is above {env_name}'s episode limit "
                             f"({environment.spec.max_steps} steps): the env would end every episode there")
        limit = max_steps if max_steps is not None else environment.spec.max_steps
        start = time.perf_counter()
        if parallel.workers > 1:
            from dapolicy.parallel_eval import WorkerSetup, run_episodes_in_workers

            setup = WorkerSetup(str(resolve_model_dir(run_dir)), _policy_device(policy), parallel.threads,
                                env_factory, env_name, ood, mode, flow_steps,
                                EpisodePlan(seed, limit, videos, out / "videos", name))
            rollouts = run_episodes_in_workers(setup, episodes, parallel.workers, progress, desc=f"eval {name}")
        else:
            rollouts = run_episodes(
                policy, environment, spec, episodes, seed, limit, mode=mode, steps=flow_steps, videos=videos,
                video_dir=out / "videos", video_prefix=name, progress=progress, desc=f"eval {name}")
        wall = time.perf_counter() - start
    finally:
        environment.close()

    records = rollouts.episodes
    n_success = sum(r["success"] for r in records)
    cfg = policy.config
    dims = ChunkDims.of(policy)
    flow_cfg = getattr(cfg, "flow", None)
    result = {
        "name": name,
        "env": env_name,
        "ood": ood_config.label,
        "ood_kind": ood_config.kind,
        "ood_strength": ood_config.strength,
        "method": policy.method,
        "n_episodes": len(records),
        "n_success": n_success,
        "success_rate": n_success / len(records),
        "ci95": list(wilson_interval(n_success, len(records))),
        "mean_score": float(np.mean([r["score"] for r in records])),
        "mean_steps": float(np.mean([r["steps"] for r in records])),
        "latency_ms": rollouts.latency_ms,
        "latency_includes_decode": rollouts.latency_includes_decode,
        "settings": {
            "seed": seed, "episode_seeds": [seed, seed + episodes - 1], "max_steps": limit,
            "mode": mode or getattr(cfg, "coupling", None),
            "flow_steps": flow_steps or getattr(flow_cfg, "steps", None),
            "videos": videos, **asdict(dims), "image_size": spec.image_size, "cameras": list(spec.cameras),
            "model_dir": str(_model_dir_or_none(run_dir)), "device": _policy_device(policy),
            "workers": parallel.workers,
        },
        "episodes": records,
        "videos": rollouts.videos,
        "wall_time_s": wall,
    }
    write_json_atomic(out / f"{name}.json", result)
    return result


def _policy_device(policy: Any) -> str | None:
    try:
        return str(next(iter(policy.parameters())).device)
    except (AttributeError, StopIteration, TypeError):
        return None


def _model_dir_or_none(path: str | Path) -> Path | None:
    try:
        return resolve_model_dir(path)
    except FileNotFoundError:
        return None


def _check_env(env_spec: EnvSpec, model_spec: EnvSpec) -> None:
    """Fail early when the env cannot feed this model (different action or proprio size, cameras, image size)."""
    trained = f"the model was trained on {model_spec.name!r}"
    for what in ("action_dim", "proprio_dim"):
        if getattr(env_spec, what) != getattr(model_spec, what):
            raise ValueError(f"env {env_spec.name!r} has {what} {getattr(env_spec, what)}, the model expects "
                             f"{getattr(model_spec, what)} ({trained}: evaluate it on that task, or pass a model "
                             f"trained for {env_spec.name!r})")
    missing = set(model_spec.cameras) - set(env_spec.cameras)
    if missing:
        raise ValueError(f"env {env_spec.name!r} lacks the model's cameras {sorted(missing)} ({trained})")
    if env_spec.image_size != model_spec.image_size:
        raise ValueError(f"env renders {env_spec.image_size} px, the model expects {model_spec.image_size} px "
                         f"({trained})")


def _note(message: str) -> None:
    """A one-line note on stderr: worth knowing, not worth stopping for."""
    import sys

    print(f"[dap eval] note: {message}", file=sys.stderr)


def _evaluate_all(run_dir: str | Path, episodes: int, seed: int, env: str | None, videos: int,
                  mode: str | None, flow_steps: int | None, max_steps: int | None, out: Path, policy: Any,
                  env_factory: EnvFactory, progress: bool, parallel: Parallelism) -> dict[str, Any]:
    """Every OOD suite on the same seeds, then a summary table (JSON and Markdown)."""
    from dapolicy.atomic import write_json_atomic

    suites = {kind: _evaluate_one(run_dir, episodes, kind, seed, env, videos, mode, flow_steps, max_steps, out,
                                  None, policy, env_factory, progress, note_env=i == 0, parallel=parallel)
              for i, kind in enumerate(OOD_SUITE)}
    rows = [{"ood": k, "success_rate": r["success_rate"], "ci95": r["ci95"], "mean_score": r["mean_score"],
             "n_episodes": r["n_episodes"], "latency_p50_ms": r["latency_ms"]["p50"]} for k, r in suites.items()]
    stem = "summary" + result_name("", mode, flow_steps)
    write_json_atomic(out / f"{stem}.json", {"rows": rows, "seed": seed})
    (out / f"{stem}.md").write_text(format_table(rows) + "\n")
    return {"suites": suites, "summary": rows}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of summary rows (success with Wilson interval, score, latency)."""
    lines = ["| suite | success | 95% CI | score | episodes | p50 ms/chunk |", "|---|---|---|---|---|---|"]
    for r in rows:
        p50 = "-" if r["latency_p50_ms"] is None else f"{r['latency_p50_ms']:.1f}"
        lines.append(f"| {r['ood']} | {r['success_rate']:.1%} | [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] | "
                     f"{r['mean_score']:.3f} | {r['n_episodes']} | {p50} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    from dapolicy import cli_options as opt

    parser.add_argument("run", help="run folder (with model/) or a saved model folder")
    parser.add_argument("--episodes", type=opt.positive_int, default=50, help="seeded episodes per suite (default 50)")
    parser.add_argument("--ood", default="none", type=_ood_argument,
                        help="none, light, distractor, novel-object, blind or all, a perturbation optionally with "
                             "a strength (light:0.8; docs/ood.md); 'all' runs none + the three perturbations and "
                             "writes a summary")
    opt.add_seed(parser, DEFAULT_SEED,
                 f"episode i uses env seed SEED+i (default {DEFAULT_SEED}, disjoint from training)")
    parser.add_argument("--env", default=None, help="task name (default: the one the model was trained on)")
    parser.add_argument("--videos", type=int, default=3, help="write videos of the first K episodes (default 3)")
    parser.add_argument("--mode", default=None,
                        help="generation mode (default: the model's; DAP: jacobi, gauss_seidel, predict_then_act, off)")
    parser.add_argument("--flow-steps", type=opt.positive_int, default=None, help="flow steps K (default: the model's)")
    parser.add_argument("--max-steps", type=opt.positive_int, default=None,
                        help="episode step limit (default: the task's)")
    opt.add_out(parser, "output folder (default RUN/eval)")
    parser.add_argument("--name", default=None, help="result file name (default: suite [+ mode, steps])")
    opt.add_device(parser)
    opt.add_threads(parser, opt.EVAL_THREADS, opt.EVAL_THREADS_HELP)
    opt.add_workers(parser)
    opt.add_quiet(parser)


def run(args: argparse.Namespace) -> int:
    result = evaluate(args.run, episodes=args.episodes, ood=args.ood, seed=args.seed, env=args.env,
                      videos=args.videos, mode=args.mode, flow_steps=args.flow_steps, max_steps=args.max_steps,
                      out_dir=args.out, name=args.name, device=args.device, threads=args.threads,
                      workers=args.workers, progress=not args.quiet)
    out = Path(args.out) if args.out else default_output_dir(args.run, "eval")
    if "suites" in result:
        print(format_table(result["summary"]))
    else:
        print(format_table([{"ood": result["ood"], "success_rate": result["success_rate"], "ci95": result["ci95"],
                             "mean_score": result["mean_score"], "n_episodes": result["n_episodes"],
                             "latency_p50_ms": result["latency_ms"]["p50"]}]))
        print(f"wrote {out / (result['name'] + '.json')}")
    return 0
