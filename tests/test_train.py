"""End-to-end tests of `dap train` on a tiny synthetic store with the real DAPPolicy ("tiny" config).

Budgets are a handful of steps per stage: these tests check the machinery (run folder, exact resume, stage
hand-over, divergence handling), not learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dapolicy.cli import main as cli_main
from dapolicy.data.store import Episode, EpisodeStore
from dapolicy.policies import DAPPolicy, FMPolicy, load_pretrained
from dapolicy.spec import EnvSpec
from dapolicy.train import RunFolderError, TrainingDiverged, train
from dapolicy.training.checkpoint import load_checkpoint
from dapolicy.training.metrics import read_metrics
from dapolicy.training.rundir import RunDir

STEPS = {"vae": 4, "dynamics": 4, "policy": 4}
FAST = dict(config="tiny", steps=STEPS, threads=1, progress=False, batch_size=4, device="cpu")


def make_store(path: Path, episodes: int = 6, length: int = 12, seed: int = 0) -> Path:
    """Random 32-px two-camera episodes: four successful experts, one failed expert, random data."""
    spec = EnvSpec(name="synthetic", cameras=("front", "wrist"), image_size=32, action_dim=2, proprio_dim=3,
                   max_steps=length, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    store = EpisodeStore.create(path, spec)
    rng = np.random.default_rng(seed)
    for i in range(episodes):
        source = "expert" if i < 5 else "random"
        store.append_episode(Episode(
            images={c: rng.integers(0, 256, (length, 32, 32, 3), dtype=np.uint8) for c in spec.cameras},
            proprio=rng.standard_normal((length, 3)).astype(np.float32),
            action=rng.uniform(-1, 1, (length, 2)).astype(np.float32),
            meta={"source": source, "seed": i, "success": i != 4}))
    return path


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "data")


@pytest.fixture(scope="module")
def reference(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run that the resume tests compare against."""
    return train(store_dir, tmp_path_factory.mktemp("ref") / "run", seed=3, **FAST)


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The saved model (EMA weights) and the raw weights of the last checkpoint."""
    model = DAPPolicy.from_pretrained(run / "model").state_dict()
    raw = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    return {"model": model, "raw": raw}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    for kind in wa:
        assert wa[kind].keys() == wb[kind].keys()
        for k in wa[kind]:
            assert torch.equal(wa[kind][k], wb[kind][k]), f"{kind} tensor {k} differs"


def test_run_folder_contents(reference: Path, store_dir: Path) -> None:
    cfg = json.loads((reference / "config.json").read_text())
    assert cfg["method"] == "dap" and cfg["config"] == "tiny" and cfg["seed"] == 3
    assert cfg["data"] == str(store_dir.resolve()) and cfg["spec"]["image_size"] == 32
    assert cfg["train"]["steps"] == STEPS and cfg["policy"]["token_dim"] == 32
    assert cfg["stages"] == ["vae", "dynamics", "policy"]
    records = read_metrics(reference / "metrics.jsonl")
    for stage in ("vae", "dynamics", "policy"):
        train_recs = [r for r in records if r["stage"] == stage and r["kind"] == "train"]
        assert [r["step"] for r in train_recs] == [4]  # log_interval 5 in tiny: only the final record
        assert train_recs[0]["samples_per_s"] > 0 and train_recs[0]["lr"] >= 0 and "loss" in train_recs[0]
        end = [r for r in records if r["stage"] == stage and r["kind"] == "stage_end"]
        assert len(end) == 1 and end[0]["samples_per_s"] > 0
        assert any(r["kind"] == "val" and r["stage"] == stage for r in records)
        assert (reference / "plots" / f"loss_{stage}.png").stat().st_size > 0
    assert "recon" in [r for r in records if r["stage"] == "vae" and r["kind"] == "train"][0]
    state = json.loads((reference / "state.json").read_text())
    assert state["stages_done"] == ["vae", "dynamics", "policy"]
    last = load_checkpoint(reference / "checkpoints" / "last.pt")
    assert last["stage"] == "policy" and last["step"] == 4
    assert {"model", "ema", "optimizer", "scheduler", "rng"} <= set(last)
    assert {"python", "numpy", "torch"} <= set(last["rng"])
    assert load_checkpoint(reference / "checkpoints" / "best.pt")["stage"] == "policy"
    assert (reference / "cache" / "latents.npy").exists()
    assert not list((reference / "checkpoints").glob("*.tmp"))


def test_saved_model_carries_ema_weights_and_predicts(reference: Path) -> None:
    policy = DAPPolicy.from_pretrained(reference / "model")
    last = load_checkpoint(reference / "checkpoints" / "last.pt")
    ema = last["ema"]["shadow"]
    for k, v in policy.policy_net.state_dict().items():
        assert torch.equal(v, ema[k])
    assert float(policy.vae.latent_scale) != 1.0  # calibrated after the VAE stage
    assert bool(policy.action_normalizer.fitted)
    obs = {"images": np.zeros((1, 2, 2, 32, 32, 3), np.uint8), "proprio": np.zeros((1, 2, 3), np.float32)}
    assert policy.predict_chunk(obs).actions.shape == (1, 16, 2)


def test_resume_after_stop_is_bit_exact(reference: Path, store_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(store_dir, run, seed=3, stop_after=4, **FAST)  # the VAE stage ends, the dynamics stage never starts
    assert json.loads((run / "state.json").read_text())["stages_done"] == ["vae"]
    train(store_dir, run, resume=True, stop_after=2, **FAST)  # stops inside the dynamics stage
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (last["stage"], last["step"]) == ("dynamics", 2)
    assert json.loads((run / "state.json").read_text())["stages_done"] == ["vae"]
    train(store_dir, run, resume=True, **FAST)
    assert_same_weights(reference, run)
    # the metrics read like one uninterrupted run: no step logged twice
    keys = [(r["stage"], r["kind"], r["step"]) for r in read_metrics(run / "metrics.jsonl")]
    assert len(keys) == len(set(keys))


def test_resume_after_keyboard_interrupt_is_bit_exact(reference: Path, store_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    original = DAPPolicy.compute_loss
    calls = {"n": 0}

    def interrupted(self, batch, stage):
        if stage == "policy":
            calls["n"] += 1
            if calls["n"] == 3:  # Ctrl-C during the forward pass of policy step 2
                raise KeyboardInterrupt
        return original(self, batch, stage)

    monkeypatch.setattr(DAPPolicy, "compute_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(store_dir, run, seed=3, **FAST)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (last["stage"], last["step"]) == ("policy", 2)  # the finished steps are kept
    monkeypatch.setattr(DAPPolicy, "compute_loss", original)
    train(store_dir, run, resume=True, **FAST)
    assert_same_weights(reference, run)


def test_stage_by_stage_equals_all(reference: Path, store_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(RunFolderError, match="earlier stage"):
        train(store_dir, run, stage="policy", seed=3, **FAST)
    with pytest.raises(RunFolderError, match=r"'policy' needs the earlier stage\(s\) \['dynamics'\]"):
        train(store_dir, run, stage="vae,policy", seed=3, **FAST)
    for stage in ("vae", "dynamics", "policy"):
        train(store_dir, run, stage=stage, seed=3, **FAST)
    assert_same_weights(reference, run)
    # the latent cache of the dynamics call was reused by the policy call (same VAE)
    mtime = (run / "cache" / "latents.npy").stat().st_mtime_ns
    train(store_dir, run, stage="policy", **FAST)
    assert (run / "cache" / "latents.npy").stat().st_mtime_ns == mtime
    # retraining an earlier stage marks the later ones unfinished (they saw the old weights)
    train(store_dir, run, stage="dynamics", **FAST)
    assert json.loads((run / "state.json").read_text())["stages_done"] == ["vae", "dynamics"]


def test_existing_run_needs_resume_or_overwrite(reference: Path, store_dir: Path) -> None:
    with pytest.raises(RunFolderError, match="--resume"):
        train(store_dir, reference, seed=3, **FAST)
    with pytest.raises(RunFolderError, match="method"):
        train(store_dir, reference, method="fm", resume=True, **{**FAST, "config": None})
    with RunDir(reference).lock(), pytest.raises(RunFolderError, match="another `dap train`"):
        train(store_dir, reference, resume=True, **FAST)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(store_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    original = DAPPolicy.compute_loss
    calls = {"n": 0}

    def poisoned(self, batch, stage):
        out = original(self, batch, stage)
        if stage == "dynamics" and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 4:  # step 3 of the dynamics stage
                out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(DAPPolicy, "compute_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"stage 'dynamics' diverged at step 3: loss = nan") as err:
        train(store_dir, run, seed=1, **{**FAST, "steps": {"vae": 4, "dynamics": 6, "policy": 2}},
              train_config=None)
    assert "last.pt" in str(err.value)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["stage"] == "vae" and last["step"] == 4  # the last good checkpoint is intact
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_fm_method_has_no_dynamics_stage(store_dir: Path, tmp_path: Path) -> None:
    run = train(store_dir, tmp_path / "fm", method="fm", **{**FAST, "steps": 2})
    assert json.loads((run / "state.json").read_text())["stages_done"] == ["vae", "policy"]
    assert type(load_pretrained(run / "model")) is FMPolicy


def test_cli(store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = cli_main(["train", "--data", str(store_dir), "--out", str(out), "--config", "tiny",
                     "--steps", "vae=2,dynamics=1,policy=1", "--batch-size", "4", "--threads", "1",
                     "--no-progress", "--device", "cpu"])
    assert code == 0
    assert (out / "model" / "model.safetensors").exists()
    assert "samples/s" in capsys.readouterr().out  # one-line stage summaries
    code = cli_main(["train", "--data", str(store_dir), "--out", str(out), "--config", "tiny", "--no-progress"])
    assert code == 2 and "--resume" in capsys.readouterr().err
    code = cli_main(["train", "--data", str(store_dir), "--out", str(out), "--method", "fm", "--config", "tiny",
                     "--steps", "1", "--overwrite", "--no-progress", "--device", "cpu"])
    assert code == 0 and json.loads((out / "config.json").read_text())["method"] == "fm"
    assert json.loads((out / "config.json").read_text())["train"]["threads"] >= 1  # auto, resolved and stored
    code = cli_main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--config",
                     "tiny", "--no-progress"])
    assert code == 2


def test_each_models_normaliser_is_fitted_on_its_own_stages_episodes(tmp_path: Path) -> None:
    """The policy learns from successful experts: its statistics come from them; the dynamics model's from
    every episode (random actions outside the experts' range included)."""
    spec = EnvSpec(name="synthetic", cameras=("front",), image_size=32, action_dim=2, proprio_dim=3, max_steps=12,
                   action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    store = EpisodeStore.create(tmp_path / "data", spec)
    rng = np.random.default_rng(0)
    for i in range(6):
        source, width = ("expert", 0.5) if i < 4 else ("random", 1.0)
        store.append_episode(Episode(images={"front": rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)},
                                     proprio=rng.standard_normal((12, 3)).astype(np.float32) * width,
                                     action=rng.uniform(-width, width, (12, 2)).astype(np.float32),
                                     meta={"source": source, "seed": i, "success": True}))
    run = train(tmp_path / "data", tmp_path / "run", **{**FAST, "steps": 1})
    policy = load_pretrained(run)
    assert float(policy.action_normalizer.high.max()) <= 0.5 < float(policy.dynamics_action_normalizer.high.max())
    fm = train(tmp_path / "data", tmp_path / "fm", method="fm", init_from=run, **{**FAST, "steps": 1})
    assert torch.equal(load_pretrained(fm).action_normalizer.high, policy.action_normalizer.high)


def test_a_stage_retrained_in_place_on_other_data_fits_its_statistics_on_that_data(store_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """`dap train --data OTHER --out RUN --stage policy` on a finished run: the policy's statistics come from
    OTHER (it trains on it), the dynamics model's stay those of the data it was trained on."""
    run = train(store_dir, tmp_path / "run", **{**FAST, "steps": 1})
    before = load_pretrained(run)
    wide = tmp_path / "wide"  # other episodes, with actions 3x wider than the first data's
    store = EpisodeStore.create(wide, EpisodeStore.open(store_dir).spec)
    rng = np.random.default_rng(5)
    for i in range(6):
        store.append_episode(Episode(images={c: rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
                                             for c in ("front", "wrist")},
                                     proprio=rng.standard_normal((12, 3)).astype(np.float32),
                                     action=rng.uniform(-3, 3, (12, 2)).astype(np.float32),
                                     meta={"source": "expert" if i < 5 else "random", "seed": i, "success": i != 4}))
    train(wide, run, stage="policy", **{**FAST, "steps": 1})
    after = load_pretrained(run)
    assert float(after.action_normalizer.high.max()) > 1.5  # fitted on the wide actions
    assert torch.equal(after.dynamics_action_normalizer.high, before.dynamics_action_normalizer.high)
    train(store_dir, run, stage="policy", **{**FAST, "steps": 1})  # back on the first data: the first statistics
    assert torch.equal(load_pretrained(run).action_normalizer.high, before.action_normalizer.high)


def test_stage_lists_and_from_a_stage_on():
    from dapolicy.train import _parse_stages

    known = ("vae", "dynamics", "policy")
    assert _parse_stages("all", known) is None and _parse_stages(None, known) is None
    assert _parse_stages("dynamics,policy", known) == ("dynamics", "policy")
    assert _parse_stages("dynamics+", known) == ("dynamics", "policy")
    assert _parse_stages("vae+", known) == known
    with pytest.raises(ValueError, match="unknown stage 'dynamic'"):
        _parse_stages("dynamic+", known)


def test_init_from_guards(reference: Path, store_dir: Path, tmp_path: Path) -> None:
    """--init-from copies into a fresh run only; a rerun must --resume (keeping the copied stages), a source's
    unfinished stage is not copied, a failed copy leaves nothing to resume, and --seed cannot change."""
    run = tmp_path / "child"
    assert train(store_dir, run, init_from=reference, stop_after=1, **FAST) == run  # stopped in the policy stage
    assert json.loads((run / "state.json").read_text())["stages_done"] == ["vae", "dynamics"]
    with pytest.raises(RunFolderError, match="--resume"):  # would have retrained the copied stages
        train(store_dir, run, init_from=reference, **FAST)
    with pytest.raises(RunFolderError, match="started from"):
        train(store_dir, run, init_from=tmp_path, resume=True, **FAST)
    train(store_dir, run, resume=True, **FAST)
    kinds = [(r.get("kind"), r.get("stage")) for r in read_metrics(run / "metrics.jsonl")]
    assert ("stage_end", "vae") not in kinds and ("stage_end", "dynamics") not in kinds
    with pytest.raises(RunFolderError, match="seed 3, not 5"):
        train(store_dir, reference, stage="policy", seed=5, **FAST)

    unfinished = tmp_path / "unfinished"
    train(store_dir, unfinished, stop_after=STEPS["vae"] + 1, **FAST)  # stopped inside the dynamics stage
    with pytest.raises(RunFolderError, match="never finished there"):
        train(store_dir, tmp_path / "c2", init_from=unfinished, **FAST)
    assert not (tmp_path / "c2" / "config.json").exists()  # a failed copy leaves no run to --resume


def test_init_from_names_the_settings_in_which_the_copied_stages_differ(reference: Path, store_dir: Path,
                                                                         tmp_path: Path, capsys) -> None:
    """Shapes agree, so the copy goes ahead, but a setting such as the prediction horizon shaped the copied
    dynamics model: the run says so instead of silently training under two configs."""
    train(store_dir, tmp_path / "same", init_from=reference, stage="policy", **FAST)
    assert "note: the copied stage(s)" not in capsys.readouterr().out
    train(store_dir, tmp_path / "other", init_from=reference, stage="policy", overrides=["next_obs_offset=4"],
          **FAST)
    out = capsys.readouterr().out
    assert "note: the copied stage(s) vae, dynamics" in out and "next_obs_offset (None there, 4 here)" in out
