"""`Trainer`: runs the stages of any method's policy (for DAP: VAE, dynamics model, policy) into a run folder.

The trainer knows no stage names: each stage is a `StageSpec` the policy declares (which episodes, which
batch layout, which cached inputs), and the policy's hooks do the method-specific work (`encode_latents` for
the latent cache, `after_stage` e.g. to calibrate the VAE's latent scale).

One call may train every stage or a subset; a later stage trained alone starts from the model the earlier
stages saved in RUN/model. A stage started from scratch always begins from the seeded initial weights, so
`--stage vae`, then `--stage dynamics`, then `--stage policy` ends where one `--stage all` run ends. A run
may also start from another run's finished stages (`init_from`): their weights and normalisers are copied
and only the later stages train, which is how an ablation of the policy stage costs one stage, not three.

In a data-parallel job (`training/distributed.py`) every process runs the same trainer on the same data;
rank 0 alone logs and writes the run folder (config, metrics, plots, checkpoints, model, latent cache) while
the others wait for it where they need what it wrote, and every process computes its share of each step.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from dapolicy.training.batches import StageBatches, frames_of, split_episodes
from dapolicy.training.checkpoint import atomic_write_json, load_checkpoint, step_seed
from dapolicy.training.config import TrainConfig
from dapolicy.training.distributed import DistEnv, broadcast_state, gather_objects, is_main, on_main
from dapolicy.training.latents import cached_latents
from dapolicy.training.loop import StageResult, StageRunner, StepBudget
from dapolicy.training.metrics import MetricsLog, NullLog, plot_losses, read_metrics
from dapolicy.training.rundir import RunDir, RunFolderError

CALIBRATION_FRAMES = 1024


def config_differences(theirs: Any, mine: Any) -> list[tuple[str, Any, Any]]:
    """(dotted field, their value, my value) for every config field both policy configs have and set
    differently (a field of one method only, e.g. DAP's dynamics model when FM copies its VAE, is skipped)."""
    from dapolicy.configuration import to_dict
    from dapolicy.overrides import flatten

    if theirs is None or mine is None:
        return []
    a, b = flatten(to_dict(theirs)), flatten(to_dict(mine))
    return [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def _say(message: str) -> None:
    """One line of progress (rank 0 only in a data-parallel job)."""
    from tqdm.auto import tqdm

    if is_main():
        tqdm.write(f"[dap train] {message}")


@dataclass
class TrainRequest:
    """What one `train` call does. `stages` is the subset to train (in the policy's order)."""

    data_dir: Path
    run: RunDir
    method: str
    config: str
    stages: tuple[str, ...] | None  # None = all of the policy's stages
    seed: int
    resume: bool
    device: torch.device
    stop_after: int | None = None
    init_from: Path | None = None  # a run/model folder whose earlier stages this run copies


class Trainer:
    """Trains the stages of `init` (a freshly, seeded-initialised policy) on the episodes of `store`."""

    def __init__(self, request: TrainRequest, cfg: TrainConfig, init: Any, run_config: dict[str, Any],
                 store: Any, env: DistEnv | None = None) -> None:
        self.req, self.cfg, self.init, self.store = request, cfg, init, store
        self.run_config = run_config  # written to RUN/config.json
        self.run = request.run
        self.env = env or DistEnv()
        self._latents: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------ setup
    def _load_data(self) -> tuple[Any, Any]:
        store = self.store
        if len(store) == 0:
            raise ValueError(f"the episode store at {store.path} is empty: run `dap collect` first")
        # every episode, in store order: episode i of `data` is store episode i (lazy: images memory-mapped)
        data = store.load(lazy=self.cfg.lean_data)
        return store, data

    def _build_policy(self, state: dict[str, Any], data: Any, store: Any) -> tuple[Any, Any]:
        """(policy to train, freshly initialised policy whose stage modules seed stages started from scratch)."""
        from dapolicy.policies.registry import load_pretrained

        init = self.init
        if state["stages_done"]:
            on_main(self._check_model)  # rank 0 may have to undo a half-done model swap first
            policy = load_pretrained(self.run.model)
        else:
            policy = copy.deepcopy(init)
            policy.fit_normalizers(lambda stage: self._stage_frames(policy, stage, data, store))
        return policy.to(self.req.device), init

    def _stage_frames(self, policy: Any, stage: str, data: Any, store: Any) -> SimpleNamespace:
        """The actions and proprio of `stage`'s episodes: what that stage's model's statistics are fitted on."""
        frames = frames_of(data.episode_ends, self._episodes(policy, stage, store))
        return SimpleNamespace(action=data.action[frames], proprio=data.proprio[frames])

    def _fit_stage_normalizers(self, policy: Any, stage: str, data: Any, store: Any) -> None:
        """Fit the statistics of the model `stage` trains on this call's data, as a new run does: a stage
        retrained in place (`--stage S` on a finished run, perhaps with other `--data`) must not keep the
        statistics of the data it was first trained on. The same data gives the same statistics, so a resumed
        stage continues with the ones it started with."""
        normalizers = policy.normalizers_by_stage().get(stage)
        if normalizers is None:  # e.g. the VAE: no action or proprio statistics
            return
        frames = self._stage_frames(policy, stage, data, store)
        action, proprio = normalizers
        action.fit(frames.action, f"{stage} action")
        proprio.fit(frames.proprio, f"{stage} proprio")

    def _check_model(self) -> None:
        self.run.recover_model()
        if not self.run.has_model():
            raise RunFolderError(f"{self.run.state_file} lists finished stages but {self.run.model} is missing")

    def _episodes(self, policy: Any, stage: str, store: Any) -> np.ndarray:
        spec = policy.stage_spec(stage)
        ids = np.asarray(store.select(spec.sources, spec.success_only), dtype=np.int64)
        if len(ids) == 0:
            raise ValueError(f"stage {stage!r}: no episodes of source {spec.sources or 'any'}"
                             f"{' (successful only)' if spec.success_only else ''} in {store.path}")
        return ids

    def _copy_stages(self, policy: Any, stages: tuple[str, ...], state: dict[str, Any], log: MetricsLog) -> None:
        """Start this run from `init_from`'s trained `stages` (weights and normalisers), then save RUN/model."""
        from dapolicy.policies.registry import load_pretrained, resolve_model_dir

        source_dir = resolve_model_dir(self.req.init_from)
        source_run = RunDir(source_dir.parent)
        source_state = source_run.read_state() if source_run.state_file.exists() else None
        unfinished = [s for s in stages if source_state is not None and s not in source_state["stages_done"]]
        if unfinished:  # a run folder's model/ is saved after every stage: a later stage may be untrained there
            raise RunFolderError(f"--init-from {source_dir.parent}: stage(s) {unfinished} never finished there "
                                 f"(finished: {', '.join(source_state['stages_done']) or 'none'}); finish it first "
                                 f"(dap train --out {source_dir.parent} --resume)")
        source = load_pretrained(source_dir)
        if tuple(source.spec.cameras) != tuple(policy.spec.cameras) or source.spec.image_size != policy.spec.image_size:
            raise RunFolderError(f"--init-from {source_dir}: trained on {source.spec.name} "
                                 f"({source.spec.image_size} px, cameras {list(source.spec.cameras)}), not on "
                                 f"this data ({policy.spec.image_size} px, cameras {list(policy.spec.cameras)})")
        for stage in stages:
            if stage not in source.stage_names:
                raise RunFolderError(f"--init-from {source_dir} ({source.method}) has no stage {stage!r} to copy; "
                                     f"its stages are {', '.join(source.stage_names)}")
            mine, theirs = policy.stage_module(stage).state_dict(), source.stage_module(stage).state_dict()
            mismatch = sorted(k for k in set(mine) | set(theirs)
                              if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape)
            if mismatch:
                raise RunFolderError(f"--init-from {source_dir}: stage {stage!r} has other shapes there "
                                     f"({', '.join(mismatch[:3])}...): its config differs; retrain it with --stage")
            policy.stage_module(stage).load_state_dict(theirs)
        differences = config_differences(getattr(source, "config", None), getattr(policy, "config", None))
        if differences:  # shapes agree, but the copied models were trained under the source's settings
            shown = ", ".join(f"{k} ({a!r} there, {b!r} here)" for k, a, b in differences[:6])
            more = f" and {len(differences) - 6} more" if len(differences) > 6 else ""
            _say(f"note: the copied stage(s) {', '.join(stages)} were trained under {source_dir}'s config, which "
                 f"differs from this run's in {shown}{more}; a setting that shapes a copied stage takes effect only "
                 f"when that stage is retrained (--stage)")
        copied_norms = []
        theirs_by_stage = source.normalizers_by_stage()
        for stage, mine_norms in policy.normalizers_by_stage().items():
            if stage in stages:  # a copied model keeps the statistics it was trained with
                for mine_norm, their_norm in zip(mine_norms, theirs_by_stage[stage]):
                    mine_norm.load_state_dict(their_norm.state_dict())
                copied_norms.append(stage)
        state["stages_done"] = list(stages)
        state["init_from"] = str(source_dir)

        def write() -> None:
            _save_model(policy, self.run.model)
            self.run.write_state(state)

        on_main(write)
        log.write({"kind": "init_from", "stage": stages[-1], "step": 0, "source": str(source_dir),
                   "stages": list(stages)})
        norms = f" and the {', '.join(copied_norms)} normalisers" if copied_norms else ""
        _say(f"copied stage(s) {', '.join(stages)}{norms} from {source_dir}")

    # ------------------------------------------------------------------------------------------ batches
    def _stage_batches(self, policy: Any, stage: str, data: Any, store: Any) -> StageBatches:
        from dapolicy.data.sampler import WindowSampler

        spec = policy.stage_spec(stage)
        train_eps, val_eps = split_episodes(data.meta, self._episodes(policy, stage, store), self.cfg.val_fraction)
        ends = data.episode_ends
        if spec.layout == "frames":
            images = data.images

            def make(ids: np.ndarray) -> dict[str, np.ndarray]:
                return {"images": images[ids]}
        else:
            sampler = WindowSampler(ends, n_obs=policy.n_obs_steps, horizon=policy.horizon,
                                    next_obs_offset=policy.next_obs_offset)
            arrays = {"proprio": data.proprio, "action": data.action}
            if "latents" in spec.inputs:
                arrays["latents"] = self._get_latents(policy, data)
            if "images" in spec.inputs:
                arrays["images"] = data.images

            def make(ids: np.ndarray) -> dict[str, np.ndarray]:
                return sampler.gather(arrays, ids)
        _, _, batch_size = self.cfg.budget(stage, policy.stage_preset(stage))
        return StageBatches(make=make, train_ids=frames_of(ends, train_eps), val_ids=frames_of(ends, val_eps),
                            batch_size=batch_size, seed=self.req.seed, stage=stage, device=self.req.device)

    def _get_latents(self, policy: Any, data: Any) -> np.ndarray:
        """The latent cache: rank 0 loads or builds it, then the other processes load what it wrote."""
        if self._latents is None:
            t0 = time.perf_counter()

            def build(write: bool) -> np.ndarray:
                return cached_latents(policy, data.images, data.episode_ends, self.run.cache,
                                      batch=self.cfg.latent_batch, progress=self.cfg.progress and write,
                                      write=write)

            kept: list[np.ndarray] = []
            on_main(lambda: kept.append(build(True)))  # nothing large travels: the others read the file
            self._latents = kept[0] if kept else build(False)
            _say(f"latents of {len(self._latents)} frames ready ({time.perf_counter() - t0:.1f}s), "
                 f"shape {tuple(self._latents.shape[1:])}, cached in {self.run.cache}")
        return self._latents

    # ------------------------------------------------------------------------------------------ run
    def run_all(self) -> Path:
        from dapolicy.configuration import to_dict

        store, data = self._load_data()
        state = on_main(self.run.read_state)
        policy, init = self._build_policy(state, data, store)
        selected = self._selected_stages(policy, state)
        policy_cfg = getattr(policy, "config", None)
        budgets = {s: dict(zip(("steps", "lr", "batch_size"), self.cfg.budget(s, policy.stage_preset(s))))
                   for s in policy.stage_names}

        def write_config() -> None:
            self.run.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run.config, {**self.run_config, "stages": list(policy.stage_names),
                                                "budgets": budgets, "spec": store.spec.to_dict(),
                                                "policy": to_dict(policy_cfg) if policy_cfg is not None else None,
                                                "num_episodes": len(store), "num_frames": int(store.num_frames)})

        on_main(write_config)
        log = (MetricsLog(self.run.metrics, logger=self.cfg.logger, run_dir=self.run.root,
                          run_config=self.run_config, wandb_project=self.cfg.wandb_project)
               if self.env.is_main else NullLog())
        try:
            self._run_stages(policy, init, selected, data, store, log, state)
        except BaseException:
            log.close(failed=True)  # wandb marks the run failed instead of leaving it "running"
            raise
        log.close()
        return self.run.root

    def _run_stages(self, policy: Any, init: Any, selected: tuple[str, ...], data: Any, store: Any, log: Any,
                    state: dict[str, Any]) -> None:
        """Copy the `init_from` stages, then train the selected ones (stopping when the step budget is spent)."""
        if self.req.init_from is not None and not state["stages_done"]:
            order = tuple(policy.stage_names)
            first = min(order.index(s) for s in selected)
            if first == 0:
                raise RunFolderError("--init-from copies the stages before the first one trained; with --stage "
                                     f"{selected[0]} there is nothing to copy (choose a later --stage)")
            try:
                self._copy_stages(policy, order[:first], state, log)
            except BaseException:
                # nothing was copied: leave no run configuration behind, or a later --resume would find a
                # "started" run without its copied stages and train them from scratch
                on_main(lambda: self.run.config.unlink(missing_ok=True))
                raise
        budget = StepBudget(self.req.stop_after)
        for stage in selected:
            if self.req.resume and stage in state["stages_done"]:
                _say(f"stage {stage!r} already finished in {self.run.root}; skipping")
                continue
            if budget.exhausted():
                _say(f"stopped before stage {stage!r}; continue with --resume")
                return
            result = self._run_stage(policy, init, stage, data, store, log, budget)
            if not result.completed:
                _say(f"stopped in stage {stage!r} at step {result.step}/{result.total}; "
                     f"continue with --resume (checkpoint {self.run.last})")
                return
            self._finish_stage(policy, stage, result, data, store, log, state)

    def _selected_stages(self, policy: Any, state: dict[str, Any]) -> tuple[str, ...]:
        """The stages this call trains, in order, after checking that each one's predecessors will be
        finished when it starts (retraining a stage un-finishes the later ones, see `_finish_stage`)."""
        stages = tuple(policy.stage_names)
        if self.req.stages is None:
            selected = stages
        else:
            unknown = [s for s in self.req.stages if s not in stages]
            if unknown:
                raise ValueError(f"stage(s) {unknown} are not stages of this policy ({', '.join(stages)})")
            selected = tuple(s for s in stages if s in self.req.stages)
        done = set(state["stages_done"])
        if self.req.init_from is not None and not done:
            return selected  # the stages before the first selected one are copied (`_copy_stages`)
        for stage in selected:
            if self.req.resume and stage in done:
                continue
            missing = [s for s in stages[: stages.index(stage)] if s not in done]
            if missing:
                raise RunFolderError(
                    f"stage {stage!r} needs the earlier stage(s) {missing} trained in {self.run.root} first "
                    f"(run `dap train --stage {missing[0]}`, or `--stage all`, with the same --out)")
            done = {s for s in done if stages.index(s) < stages.index(stage)} | {stage}
        return selected

    def _run_stage(self, policy: Any, init: Any, stage: str, data: Any, store: Any, log: MetricsLog,
                   budget: StepBudget) -> StageResult:
        ckpt = None
        if self.req.resume and self.run.last.exists():
            candidate = load_checkpoint(self.run.last, map_location=self.req.device)
            if candidate.get("stage") == stage:
                ckpt = candidate
        starts = gather_objects(None if ckpt is None else int(ckpt["step"]))
        if len(set(starts)) > 1:  # each process read RUN/checkpoints/last.pt itself: it must be one file
            raise RunFolderError(f"the processes found different checkpoints in {self.run.last} (steps {starts}): "
                                 f"the run folder must be on a filesystem that every node sees")
        if ckpt is None:  # from scratch: the seeded initial weights, whatever an earlier call left
            policy.stage_module(stage).load_state_dict(init.stage_module(stage).state_dict())
            if self.env.is_main and self.run.best.exists():
                self.run.best.unlink()
        self._fit_stage_normalizers(policy, stage, data, store)
        batches = self._stage_batches(policy, stage, data, store)
        runner = StageRunner(policy, stage, batches, self.cfg, self.run, log, self.req.seed, self.req.device,
                             extra_state={"method": self.req.method, "config": self.req.config}, env=self.env)
        if ckpt is not None:
            if int(ckpt["total_steps"]) != runner.total:
                _say(f"warning: stage {stage!r} checkpoint was made for {ckpt['total_steps']} steps, now "
                     f"{runner.total}: the learning-rate schedule changes, the result will differ from an "
                     f"uninterrupted run")
            if int(ckpt.get("micro_batches", 1)) != runner.pieces:
                _say(f"warning: stage {stage!r} checkpoint was made with {ckpt.get('micro_batches', 1)} "
                     f"micro-batch(es) per step, now {runner.pieces}: the noise of each step changes, the result "
                     f"will differ from an uninterrupted run")
            runner.load(ckpt)
            log.truncate_after(tuple(policy.stage_names), stage, runner.step)
            _say(f"resuming stage {stage!r} at step {runner.step}/{runner.total}")
        else:
            log.truncate_after(tuple(policy.stage_names), stage, 0)
        broadcast_state(policy)  # every replica starts the stage from rank 0's weights and buffers
        n_train, n_val = len(batches.train_ids), len(batches.val_ids)
        split = ""
        if runner.pieces > 1:
            mine, sizes = len(runner.mine), sorted({hi - lo for lo, hi in runner.bounds})
            split = (f" = {runner.pieces} micro-batches of {'/'.join(map(str, sizes))} ({self.env.world_size} "
                     f"process(es), {mine} micro-batch(es) each on rank 0)")
        _say(f"stage {stage!r}: {runner.total} steps, batch {runner.batch_size}{split}, {n_train} train / {n_val} "
             f"validation frames, {sum(p.numel() for p in runner.params):,} parameters, device "
             f"{self.req.device}")
        result = runner.train(budget)
        if result.completed:
            runner.finalize_weights()
        return result

    def _finish_stage(self, policy: Any, stage: str, result: StageResult, data: Any, store: Any,
                      log: MetricsLog, state: dict[str, Any]) -> None:
        frames = frames_of(data.episode_ends, self._episodes(policy, stage, store))
        rng = np.random.default_rng(step_seed(self.req.seed, "calibrate", 0))
        pick = np.sort(rng.choice(frames, size=min(CALIBRATION_FRAMES, len(frames)), replace=False))
        for key, value in policy.after_stage(stage, data.images[pick]).items():
            _say(f"after stage {stage!r}: {key} = {value:.4g} (from {len(pick)} frames)")
        if policy.stage_spec(stage).changes_latents:
            self._latents = None
        summary = result.summary()
        order = tuple(policy.stage_names)
        later = [s for s in state["stages_done"] if order.index(s) > order.index(stage)]
        if later:  # they were trained against the old version of this stage
            _say(f"note: stage(s) {later} were trained on the previous {stage!r} weights and are marked "
                 f"unfinished; retrain them (e.g. --resume)")
        state["stages_done"] = [s for s in state["stages_done"] if order.index(s) < order.index(stage)] + [stage]
        state.setdefault("summaries", {})[stage] = summary

        def write() -> None:
            _save_model(policy, self.run.model)
            log.write({"kind": "stage_end", "stage": stage, "step": result.step, **summary})
            plot_losses(read_metrics(self.run.metrics), stage, self.run.plots / f"loss_{stage}.png")
            self.run.write_state(state)

        on_main(write)  # the other processes wait here, so a later stage or call finds the model written
        best = (f", best val {result.best_val:.4g} @ {result.best_step}" if summary["best_val"] is not None else "")
        _say(f"stage {stage!r} done: {result.step} steps in {result.seconds:.1f}s, "
             f"{result.samples_per_s:.1f} samples/s, last loss {result.last_loss:.4g}{best}; "
             f"model saved to {self.run.model}")


def _save_model(policy: Any, directory: Path) -> None:
    """`save_pretrained` into a sibling folder, then swap it in, so RUN/model is never half old, half new."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    old = directory.with_name(f".{directory.name}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    policy.save_pretrained(tmp)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


def environment_info(device: torch.device, env: DistEnv | None = None) -> dict[str, Any]:
    """What the run trained on (rank 0's view; `world_size` processes, each on its own device of this kind)."""
    env = env or DistEnv()
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "world_size": env.world_size,
            "backend": ("nccl" if device.type == "cuda" else "gloo") if env.enabled else None}
