"""`dap diagnose`: the paper's Fig. 2 - how good the flow extrapolations are along the flow time tau.

At every flow step the coupled sampler hands each model the other's *extrapolated* clean estimate
(x_hat_1(tau) = x_tau + (1 - tau) v). The method only works if these estimates are informative early, so we
measure them on held-out expert windows:

* next frames: decode Z_hat(tau) with the policy's VAE; PSNR per camera vs (a) the real next frame o_{t+k}
  and (b) the final prediction (the reference line is the final prediction's PSNR vs the real frame);
* actions: MSE of A_hat(tau) vs (a) the final chunk and (b) the demonstrated chunk, in the policy's
  normalised [-1, 1] units (padded steps past the episode end excluded).

Validation windows come from the run's data (RUN/config.json): its `val_episodes` (store indices) if
recorded, else the expert episodes `dap train` held out of the policy stage (recomputed from its
`train.val_fraction`), else the last 10% of the expert episodes. Writes RUN/diagnose/diagnose.json, a plot
(diagnose.png) and an image strip of decoded Z_hat(tau) next to the real next frame (strip.png).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dapolicy.evaluate import ChunkDims, check_mode, default_output_dir, load_policy
from dapolicy.stats import psnr

#: PSNR of identical images is infinite; this cap keeps curves finite (and JSON valid).
PSNR_CAP_DB = 100.0
VAL_FRACTION = 0.1


# ----------------------------------------------------------------------------------------------- data
def _find_data_path(config: dict[str, Any]) -> str | None:
    """The dataset path recorded in a run's config.json (top level or under a `data` section)."""
    for key in ("data", "data_path", "data_dir", "store", "dataset"):
        value = config.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            for sub in ("path", "data", "dir", "store"):
                if isinstance(value.get(sub), str):
                    return value[sub]
    return None


def _find_val_episodes(config: dict[str, Any]) -> list[int] | None:
    for section in (config, config.get("data") if isinstance(config.get("data"), dict) else {}):
        value = section.get("val_episodes")
        if value is not None:
            return [int(v) for v in value]
    return None


def _run_config_path(path: Path) -> Path:
    """RUN/config.json for a run folder, or for a model folder inside one (RUN/model -> RUN/config.json)."""
    if (path / "model.safetensors").exists():  # a model folder: its config.json describes the model only
        return path.parent / "config.json"
    return path / "config.json"


def held_out_experts(store: Any, config: dict[str, Any]) -> list[int]:
    """The expert episodes the trainer held out of the policy stage (store indices).

    A run trained by `dap train` records its `train.val_fraction`; the trainer's split is a hash of each
    episode's (source, seed), so we recompute exactly the same held-out set. Without it (other trainers),
    the last VAL_FRACTION of the successful expert episodes.
    """
    experts = store.select(sources=("expert",), success_only=True)
    train_cfg = config.get("train") if isinstance(config.get("train"), dict) else {}
    fraction = train_cfg.get("val_fraction")
    if fraction:
        from dapolicy.training.batches import split_episodes

        _, val = split_episodes(store.meta, np.asarray(experts, dtype=np.int64), float(fraction))
        if len(val):
            return [int(v) for v in val]
    n_val = max(1, int(round(VAL_FRACTION * len(experts))))
    return experts[-n_val:]


def validation_episodes(run_dir: str | Path, data_path: str | Path | None = None,
                        max_episodes: int | None = None) -> tuple[Any, list[int], str]:
    """Load the held-out expert episodes of a run -> (EpisodeData, their store indices, data path).

    data_path overrides the path in RUN/config.json (needed when diagnosing a bare model folder).
    """
    from dapolicy.atomic import CorruptFileError, read_json
    from dapolicy.data.store import EpisodeStore

    cfg_path = _run_config_path(Path(run_dir))
    try:
        config = read_json(cfg_path, "pass the model folder and the training data: dap diagnose RUN/model --data "
                                     "DATA") if cfg_path.is_file() else {}
    except CorruptFileError:
        if data_path is None:
            raise
        print(f"[dap diagnose] note: {cfg_path} is corrupt, so the run's validation split is unknown; validating on "
              f"the last {VAL_FRACTION:.0%} of the expert episodes of {data_path}", file=sys.stderr)
        config = {}
    config = config if isinstance(config, dict) else {}
    path = data_path or _find_data_path(config)
    if path is None:
        raise ValueError(f"cannot tell which data {run_dir} was trained on: no data path in {cfg_path}; "
                         "pass --data")
    if not Path(path).exists() and (Path(run_dir) / path).exists():
        path = Path(run_dir) / path  # recorded relative to the run folder
    if data_path is None and not Path(path).exists():
        raise FileNotFoundError(f"the training data of {run_dir} is not at {path} any more (the path recorded in "
                                f"{cfg_path}): pass its new location with --data")
    store = EpisodeStore.open(path)
    val = _find_val_episodes(config)
    if val is None:
        val = held_out_experts(store, config)
    if max_episodes is not None:
        val = val[:max_episodes]
    data = store.load(sources=("expert",), episodes=val)
    if data.num_episodes == 0:
        raise ValueError(f"no validation expert episodes in {path} (asked for store indices {val[:10]}...)")
    return data, [int(m["store_index"]) for m in data.meta], str(path)


def choose_windows(n_frames: int, windows: int, seed: int) -> np.ndarray:
    """`windows` distinct frame ids (all of them if there are fewer), seeded and sorted."""
    rng = np.random.default_rng(seed)
    if windows >= n_frames:
        return np.arange(n_frames, dtype=np.int64)
    return np.sort(rng.choice(n_frames, size=windows, replace=False)).astype(np.int64)


def to_numpy(x: Any) -> np.ndarray:
    """Tensor or array -> numpy array on the host."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


# ----------------------------------------------------------------------------------------------- metrics
def _normalized_actions(policy: Any, actions: np.ndarray) -> np.ndarray:
    """Env-unit actions -> the policy's normalised [-1, 1] units (its saved action normaliser)."""
    import torch

    norm = policy.action_normalizer
    device = next(iter(norm.buffers())).device
    return to_numpy(norm.normalize(torch.as_tensor(np.asarray(actions), device=device))).astype(np.float64)


def _capped_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR per image over the last three axes ([..., S, S, 3]), capped at PSNR_CAP_DB."""
    return np.minimum(psnr(a, b, axes=(-3, -2, -1)), PSNR_CAP_DB)


def _masked_mse(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-sample MSE of chunks [..., B, H, A] over steps where `valid` [B, H] holds."""
    err = ((a - b) ** 2).mean(axis=-1)  # [..., B, H]
    w = valid.astype(np.float64)
    return (err * w).sum(axis=-1) / np.maximum(w.sum(axis=-1), 1.0)


def diagnose(run_dir: str | Path, episodes: int | None = None, windows: int = 32, out_dir: str | Path | None = None,
             data_path: str | Path | None = None, mode: str | None = None, flow_steps: int | None = None,
             batch_size: int = 16, strip_windows: int = 3, seed: int = 0, policy: Any = None,
             progress: bool = True, device: str | None = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Compute the Fig. 2 curves on validation windows and write diagnose.json, diagnose.png, strip.png.

    episodes: use at most this many validation episodes; windows: number of (seeded) windows;
    strip_windows: how many of them the image strip shows (at most `windows`).
    threads: torch CPU threads meanwhile (None = torch's setting; restored afterwards).
    Returns the JSON payload: per-tau curves (mean over windows) and the final-prediction references.
    """
    from dapolicy.runtime import torch_threads

    for name, value in (("episodes", episodes), ("windows", windows), ("threads", threads),
                        ("strip_windows", strip_windows)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (--{name}), got {value}")
    with torch_threads(threads):
        return _diagnose(run_dir, episodes, windows, out_dir, data_path, mode, flow_steps, batch_size,
                         strip_windows, seed, policy, progress, device)


def _diagnose(run_dir: str | Path, episodes: int | None, windows: int, out_dir: str | Path | None,
              data_path: str | Path | None, mode: str | None, flow_steps: int | None, batch_size: int,
              strip_windows: int, seed: int, policy: Any, progress: bool, device: str | None) -> dict[str, Any]:
    """`diagnose` with its arguments checked and torch's threads set."""
    import torch
    from tqdm.auto import tqdm

    from dapolicy.atomic import write_json_atomic
    from dapolicy.data.sampler import WindowSampler

    if policy is None:
        policy = load_policy(run_dir, device)
    check_mode(policy, mode)
    if not policy.capabilities.has_trace:
        raise ValueError(f"method {policy.method!r} records no sampling trace: diagnose has nothing to plot")
    out = Path(out_dir) if out_dir is not None else default_output_dir(run_dir, "diagnose")
    data, val_ids, path = validation_episodes(run_dir, data_path, episodes)
    dims = ChunkDims.of(policy)
    sampler = WindowSampler(data.episode_ends, n_obs=dims.n_obs_steps, horizon=dims.horizon,
                            next_obs_offset=dims.next_obs_offset)
    ids = choose_windows(len(sampler), windows, seed)
    with_frames = policy.capabilities.predicts_next_obs and mode != "off"
    kwargs: dict[str, Any] = {k: v for k, v in (("mode", mode), ("steps", flow_steps)) if v is not None}

    torch.manual_seed(seed)
    taus: list[float] = []
    psnr_real, psnr_final, final_psnr_real = [], [], []  # [K, B, C] per batch, then [B, C]
    mse_final, mse_demo, final_mse_demo = [], [], []  # [K, B], then [B]
    strip: dict[str, np.ndarray] = {}
    baselines: dict[str, list[np.ndarray]] = {k: [] for k in BASELINE_KEYS}
    reliance: dict[str, list[np.ndarray]] = {k: [] for k in RELIANCE_KEYS}
    # "Another window's action": half-way around the sorted window list, i.e. another episode or time.
    other_ids = np.roll(ids, len(ids) // 2)
    for start in tqdm(range(0, len(ids), batch_size), desc="diagnose", disable=not progress, unit="batch"):
        batch = sampler.gather(data.arrays(), ids[start:start + batch_size])
        obs = {"images": batch["images"], "proprio": batch["proprio"]}
        with torch.no_grad():
            pred = policy.predict_chunk(obs, return_next=with_frames, return_trace=True, **kwargs)
        final_frames, trace = pred.next_frames, pred.trace
        taus = [float(t) for t in trace["tau"]]
        a_hat = to_numpy(trace["a_hat"]).astype(np.float64)  # [K, B, H, A], normalised
        demo = _normalized_actions(policy, batch["action"])
        valid = ~np.asarray(batch["action_is_pad"], bool)
        everything = np.ones_like(valid)
        mse_final.append(_masked_mse(a_hat, a_hat[-1], everything))
        mse_demo.append(_masked_mse(a_hat, demo, valid))
        final_mse_demo.append(_masked_mse(a_hat[-1], demo, valid))
        if with_frames and trace.get("z_hat") is not None:
            z_hat = torch.as_tensor(trace["z_hat"])  # [K, B, C, c, h, w]
            decoded = to_numpy(policy.decode_latents(z_hat))  # [K, B, C, S, S, 3]
            final = to_numpy(final_frames) if final_frames is not None else decoded[-1]
            real = np.asarray(batch["next_images"])  # [B, C, S, S, 3]
            psnr_real.append(_capped_psnr(decoded, real[None]))
            psnr_final.append(_capped_psnr(decoded, final[None]))
            final_psnr_real.append(_capped_psnr(final, real))
            other = sampler.gather({"action": data.action, "images": data.images},
                                   other_ids[start:start + batch_size])  # one gather for both references
            predictions: dict[str, np.ndarray] = {}
            for key, value in _frame_baselines(policy, obs, batch, other["action"], real, seed + start,
                                               predictions).items():
                baselines[key].append(value)
            if hasattr(policy, "act_given_next"):
                for key, value in _next_obs_reliance(policy, obs, real, np.asarray(other["next_images"]),
                                                     demo, valid, seed + start).items():
                    reliance[key].append(value)
            shown = strip["real"].shape[0] if strip else 0
            if shown < strip_windows:  # the strip's windows, gathered over as many batches as it needs
                n = min(strip_windows - shown, real.shape[0])
                part = {"decoded": decoded[:, :n], "final": final[:n], "real": real[:n],
                        "current": np.asarray(batch["images"])[:n, -1],
                        **{key: frames[:n] for key, frames in predictions.items()}}
                strip = {key: np.concatenate([strip[key], value], axis=1 if key == "decoded" else 0)
                         if strip else value for key, value in part.items()}

    result: dict[str, Any] = {
        "tau": taus,
        "n_windows": int(len(ids)),
        "val_episodes": val_ids,
        "data": path,
        "settings": {"mode": mode or getattr(policy.config, "coupling", None),
                     "flow_steps": flow_steps or len(taus), "seed": seed, **asdict(dims)},
        "action_mse_vs_final": np.concatenate(mse_final, axis=1).mean(axis=1).tolist(),
        "action_mse_vs_demo": np.concatenate(mse_demo, axis=1).mean(axis=1).tolist(),
        "final_action_mse_vs_demo": float(np.concatenate(final_mse_demo).mean()),
    }
    cameras = list(policy.spec.cameras)
    if psnr_real:
        pr = np.concatenate(psnr_real, axis=1).mean(axis=1)  # [K, C]
        pf = np.concatenate(psnr_final, axis=1).mean(axis=1)
        fr = np.concatenate(final_psnr_real, axis=0).mean(axis=0)  # [C]
        result["psnr_vs_real"] = {cam: pr[:, i].tolist() for i, cam in enumerate(cameras)}
        result["psnr_vs_final"] = {cam: pf[:, i].tolist() for i, cam in enumerate(cameras)}
        result["final_psnr_vs_real"] = {cam: float(fr[i]) for i, cam in enumerate(cameras)}
        result["psnr_cap_db"] = PSNR_CAP_DB
        result.update(_summarize_baselines(baselines, cameras))
    if reliance["real"]:
        # Demo-action error of the policy alone given the real next frames, another window's, or none,
        # beside the coupled sampler's: a policy that reads o_{t+k} scores "real" << "shuffled"/"null", and
        # a "coupled" close to "null" says the dynamics model's estimate adds little.
        result["next_obs_reliance"] = {k: float(np.concatenate(v).mean()) for k, v in reliance.items()}
        result["next_obs_reliance"]["coupled"] = result["final_action_mse_vs_demo"]

    unet = getattr(getattr(policy, "policy_net", None), "unet", None)
    gates = unet.prediction_gates() if unet is not None else []
    if gates:
        # how much of the prediction's attention each gated layer lets in (0 = the policy ignores it)
        result["prediction_gates"] = gates
    out.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(plot_curves(result, out / "diagnose.png"))
    if strip:
        result["strip"] = str(plot_strip(strip, taus, cameras, out / "strip.png"))
    write_json_atomic(out / "diagnose.json", result)
    return result


def format_gates(gates: list[float]) -> str:
    """A policy's prediction gates (`result["prediction_gates"]`) on one line, in execution order."""
    return " ".join(f"{g:+.3f}" for g in gates)


BASELINE_KEYS = ("copy_current", "vae_recon", "true_action", "other_action", "predicted_change", "real_change",
                 "change_residual_true", "change_residual_other", "change_residual_no_action", "change_residual_vae")
#: per-window mean squared pixel quantities ([0, 1] units): averaged over windows, not turned into PSNR
CHANGE_KEYS = ("predicted_change", "real_change", "change_residual_true", "change_residual_other",
               "change_residual_no_action", "change_residual_vae")


def change_residual(predicted: np.ndarray, reference: np.ndarray, current: np.ndarray,
                    real: np.ndarray) -> np.ndarray:
    """Per image: mean squared difference between the predicted change and the real change, in [0, 1] units.

    The predicted change is measured from `reference`, the model's own picture of the current frame (its VAE
    reconstruction), the real change from the current frame to the real next one. Measuring from the
    reconstruction is what makes the figure honest: a VAE that erases a small object (PushT's agent) erases it
    in both pictures, so a prediction without it shows no change and earns nothing, where against the real
    current frame it would be credited with "removing" the object from its old place.
    """
    to01 = 1.0 / 255.0
    predicted_change = (np.asarray(predicted, np.float64) - np.asarray(reference, np.float64)) * to01
    real_change = (np.asarray(real, np.float64) - np.asarray(current, np.float64)) * to01
    return ((predicted_change - real_change) ** 2).mean(axis=(-3, -2, -1))


def change_explained(residual: float, real_change: float) -> float:
    """Fraction of the real change a prediction reproduces: 1 - residual / real change (both mean squares).

    1: the prediction shows the real change; 0: it shows none (copying the frame); below 0: it adds change
    that did not happen. Unlike the action sensitivity it looks only at the prediction given the true chunk,
    so a model cannot raise it by spoiling its frame for other chunks.
    """
    return float(1.0 - residual / max(real_change, 1e-12))


def change_explained_by_action(true: float, no_action: float) -> float:
    """The part of the change only the action explains: the true chunk's `change_explained` minus that of the
    model's own no-action prediction, capped at what the true chunk explains at all (and at 0 if that is
    negative).

    Why not true minus other chunk: a model that spoils its frame for other chunks drives that term below 0
    and would be credited for it. The cap does the same for a spoiled no-action frame; a model that ignores
    the action scores 0.
    """
    return float(min(true - no_action, max(true, 0.0)))


def _frame_baselines(policy: Any, obs: dict[str, Any], batch: dict[str, Any], other_actions: np.ndarray,
                     real: np.ndarray, seed: int,
                     predictions: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per window and camera: the references a next-frame prediction must beat, and its action sensitivity.

    copy_current: PSNR of simply copying the current frame (a model that ignores time scores this).
    vae_recon: PSNR of the VAE's own reconstruction of the real next frame (the ceiling in latent space).
    true_action / other_action: PSNR vs the real next frame of the dynamics model's prediction given the
        demonstrated chunk, and given another window's chunk (`other_actions`: from half-way around the
        sorted window list, so another episode or another phase of it): a model that uses the action scores
        clearly higher with the true one.
    predicted_change / real_change: mean squared pixel change between the two predictions, and between the
        real next frame and the current frame (the change the demonstrated action caused), in [0, 1] units.
    change_residual_true / _other / _no_action / _vae: `change_residual` of the prediction given the
        demonstrated chunk, given the other chunk, in the model's action-free mode (the null action token: what
        the scene alone predicts; only for a model trained with `action_dropout` > 0), and of the VAE's
        reconstruction of the real next frame (the ceiling), each measured from the VAE's reconstruction of the
        current frame (`change_explained` turns them into fractions of the real change).
    predictions: if given, receives the two predicted frames ("pred_true", "pred_other") for the strip. A
        model can score a high sensitivity by spoiling its frame for an implausible chunk instead of showing
        the chunk's consequence; the pictures and the change explained by the true chunk tell the two apart.
    """
    import torch

    current = np.asarray(batch["images"])[:, -1]
    out = {"copy_current": _capped_psnr(current, real)}
    reference = current  # the model's own picture of the current frame (its VAE's, if it has one)
    if hasattr(policy, "encode_latents") and hasattr(policy, "decode_latents"):
        real_recon = to_numpy(policy.decode_latents(policy.encode_latents(real)))
        reference = to_numpy(policy.decode_latents(policy.encode_latents(current)))
        out["vae_recon"] = _capped_psnr(real_recon, real)
        out["change_residual_vae"] = change_residual(real_recon, reference, current, real)
    if hasattr(policy, "predict_next"):
        actions, other = np.asarray(batch["action"]), np.asarray(other_actions)
        true_pred = policy.predict_next(obs, actions, generator=torch.Generator().manual_seed(seed))
        other_pred = policy.predict_next(obs, other, generator=torch.Generator().manual_seed(seed))
        if predictions is not None:
            predictions.update(pred_true=np.asarray(true_pred), pred_other=np.asarray(other_pred))
        out["true_action"] = _capped_psnr(true_pred, real)
        out["other_action"] = _capped_psnr(other_pred, real)
        to01 = 1.0 / 255.0
        out["predicted_change"] = (((true_pred - other_pred.astype(np.float64)) * to01) ** 2).mean(axis=(-3, -2, -1))
        out["real_change"] = (((real - current.astype(np.float64)) * to01) ** 2).mean(axis=(-3, -2, -1))
        out["change_residual_true"] = change_residual(true_pred, reference, current, real)
        out["change_residual_other"] = change_residual(other_pred, reference, current, real)
        if getattr(getattr(policy, "config", None), "action_dropout", 0.0) > 0:  # else no trained no-action mode
            no_action_pred = policy.predict_next(obs, None, generator=torch.Generator().manual_seed(seed))
            out["change_residual_no_action"] = change_residual(no_action_pred, reference, current, real)
    return out


RELIANCE_KEYS = ("real", "shuffled", "null")


def _next_obs_reliance(policy: Any, obs: dict[str, Any], real: np.ndarray, other: np.ndarray, demo: np.ndarray,
                       valid: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Per window: normalised demo-action MSE of the policy conditioned on the real next frames, on another
    window's real next frames (the same ones `other_action` uses), and on the null next observation; the same
    action noise for all three, so only the condition differs."""
    import torch

    out = {}
    for key, frames in (("real", real), ("shuffled", other), ("null", None)):
        actions = policy.act_given_next(obs, frames, generator=torch.Generator().manual_seed(seed))
        out[key] = _masked_mse(_normalized_actions(policy, actions), demo, valid)
    return out


def _summarize_baselines(baselines: dict[str, list[np.ndarray]], cameras: list[str]) -> dict[str, Any]:
    """Per camera means of the references, plus `action_psnr_gain_db`, `action_sensitivity` and
    `change_explained` (true chunk / other chunk / no action / VAE ceiling, and `action`: the part only the
    action explains, `change_explained_by_action`; ratios of means over windows, so windows where little moves
    do not dominate)."""
    out: dict[str, Any] = {}
    means = {k: np.concatenate(v, axis=0).mean(axis=0) for k, v in baselines.items() if v}
    for key, values in means.items():
        out[f"{'psnr_' if key not in CHANGE_KEYS else ''}{key}"] = {
            cam: float(values[i]) for i, cam in enumerate(cameras)}
    if "true_action" in means:
        out["action_psnr_gain_db"] = {cam: float(means["true_action"][i] - means["other_action"][i])
                                      for i, cam in enumerate(cameras)}
        out["action_sensitivity"] = {cam: float(means["predicted_change"][i] / max(means["real_change"][i], 1e-12))
                                     for i, cam in enumerate(cameras)}
        out["change_explained"] = {
            source: {cam: change_explained(means[f"change_residual_{source}"][i], means["real_change"][i])
                     for i, cam in enumerate(cameras)}
            for source in ("true", "other", "no_action", "vae") if f"change_residual_{source}" in means}
        explained = out["change_explained"]
        if "no_action" in explained:
            explained["action"] = {cam: change_explained_by_action(explained["true"][cam], explained["no_action"][cam])
                                   for cam in cameras}
    return out


# ----------------------------------------------------------------------------------------------- plots
def plot_curves(result: dict[str, Any], path: Path) -> Path:
    """PSNR per camera vs tau (left, if the policy predicts frames) and action MSE vs tau (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau = result["tau"]
    has_frames = "psnr_vs_real" in result
    fig, axes = plt.subplots(1, 2 if has_frames else 1, figsize=(10 if has_frames else 5, 3.6), squeeze=False)
    axes = axes[0]
    if has_frames:
        ax = axes[0]
        for i, cam in enumerate(result["psnr_vs_real"]):
            color = f"C{i}"
            ax.plot(tau, result["psnr_vs_real"][cam], "o-", color=color, label=f"{cam}: vs real next frame")
            # Points at the cap are identical images (the last step *is* the final prediction): not drawn.
            vs_final = np.where(np.asarray(result["psnr_vs_final"][cam]) >= PSNR_CAP_DB, np.nan,
                                result["psnr_vs_final"][cam])
            ax.plot(tau, vs_final, "s--", color=color, alpha=0.6, label=f"{cam}: vs final")
            ax.axhline(result["final_psnr_vs_real"][cam], color=color, ls=":", label=f"{cam}: final vs real")
            if "psnr_copy_current" in result:
                ax.axhline(result["psnr_copy_current"][cam], color=color, ls="-.", alpha=0.5,
                           label=f"{cam}: copy current frame")
        ax.set_xlabel("flow time tau")
        ax.set_ylabel("PSNR of decoded Z_hat(tau) [dB]")
        ax.set_title("extrapolated next frame")
        ax.legend(fontsize=7)
    ax = axes[-1]
    # Log scale; exact zeros (the last extrapolation equals the final chunk) cannot be drawn and are skipped.
    def positive(values: list[float]) -> np.ndarray:
        return np.where(np.asarray(values) > 0, values, np.nan)

    ax.plot(tau, positive(result["action_mse_vs_demo"]), "o-", label="vs demonstrated chunk")
    ax.plot(tau, positive(result["action_mse_vs_final"]), "s--", label="vs final chunk")
    ax.axhline(result["final_action_mse_vs_demo"], color="k", ls=":", label="final vs demonstrated")
    ax.set_yscale("log")
    ax.set_xlabel("flow time tau")
    ax.set_ylabel("MSE of A_hat(tau) (normalised units)")
    ax.set_title("extrapolated action chunk")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_strip(strip: dict[str, np.ndarray], taus: list[float], cameras: list[str], path: Path) -> Path:
    """Rows = (window, camera); columns = current frame, decoded Z_hat(tau_k) for every k, final, real next,
    and (when the strip has them) the dynamics model's prediction given the demonstrated chunk and given
    another window's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decoded = strip["decoded"]  # [K, n, C, S, S, 3]
    k, n, c = decoded.shape[:3]
    extra = [(key, title) for key, title in (("pred_true", "true chunk"), ("pred_other", "other chunk"))
             if key in strip]
    cols = k + 3 + len(extra)
    fig, axes = plt.subplots(n * c, cols, figsize=(1.1 * cols, 1.2 * n * c), squeeze=False)
    for w in range(n):
        for ci in range(c):
            row = axes[w * c + ci]
            images = [strip["current"][w, ci], *[decoded[j, w, ci] for j in range(k)], strip["final"][w, ci],
                      strip["real"][w, ci], *[strip[key][w, ci] for key, _ in extra]]
            titles = ["current", *[f"tau={t:.2f}" for t in taus], "final", "real next", *[t for _, t in extra]]
            for ax, im, title in zip(row, images, titles):
                ax.imshow(im, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if w == 0 and ci == 0:
                    ax.set_title(title, fontsize=7)
            row[0].set_ylabel(f"win {w}\n{cameras[ci]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    from dapolicy import cli_options as opt

    parser.add_argument("run", help="run folder (with model/ and config.json) or a model folder (then --data)")
    parser.add_argument("--episodes", type=opt.positive_int, default=None, help="use at most N validation episodes")
    parser.add_argument("--windows", type=opt.positive_int, default=32,
                        help="number of validation windows (default 32)")
    opt.add_out(parser, "output folder (default RUN/diagnose)")
    parser.add_argument("--data", default=None,
                        help="episode store (default: the run's training data, as recorded in RUN/config.json)")
    parser.add_argument("--mode", default=None,
                        help="generation mode (default: the model's; DAP: jacobi, gauss_seidel, predict_then_act, off)")
    parser.add_argument("--flow-steps", type=opt.positive_int, default=None, help="flow steps K (default: the model's)")
    parser.add_argument("--strip-windows", type=opt.positive_int, default=3,
                        help="windows shown in strip.png (default 3; at most --windows)")
    opt.add_seed(parser, 0, "seed of the window choice and the sampling noise (default 0)")
    opt.add_device(parser)
    opt.add_threads(parser, opt.EVAL_THREADS, opt.EVAL_THREADS_HELP)
    opt.add_quiet(parser)


def run(args: argparse.Namespace) -> int:
    result = diagnose(args.run, episodes=args.episodes, windows=args.windows, out_dir=args.out,
                      data_path=args.data, mode=args.mode, flow_steps=args.flow_steps, seed=args.seed,
                      strip_windows=args.strip_windows,
                      device=args.device, threads=args.threads, progress=not args.quiet)
    print(f"tau:                     {' '.join(f'{t:6.2f}' for t in result['tau'])}")
    for cam, curve in result.get("psnr_vs_real", {}).items():
        print(f"PSNR {cam[:12]:>12} vs real: {' '.join(f'{v:6.2f}' for v in curve)}")
    for cam in result.get("psnr_copy_current", {}):
        recon = result.get("psnr_vae_recon", {}).get(cam)
        print(f"{cam[:12]:>12}: final {result['final_psnr_vs_real'][cam]:.2f} dB, copy current frame "
              f"{result['psnr_copy_current'][cam]:.2f} dB"
              + (f", VAE reconstruction {recon:.2f} dB" if recon is not None else "")
              + (f", true vs other action {result['psnr_true_action'][cam]:.2f} / "
                 f"{result['psnr_other_action'][cam]:.2f} dB (gain {result['action_psnr_gain_db'][cam]:+.2f}), "
                 f"action sensitivity {result['action_sensitivity'][cam]:.2f}" if "action_psnr_gain_db" in result
                 else ""))
        explained = result.get("change_explained", {})
        if "true" in explained:
            print(f"{cam[:12]:>12}: change explained, true chunk {explained['true'][cam]:+.3f}, other chunk "
                  f"{explained['other'][cam]:+.3f}"
                  + (f", no action {explained['no_action'][cam]:+.3f} (the action's own part "
                     f"{explained['action'][cam]:+.3f})" if "action" in explained else "")
                  + (f", VAE ceiling {explained['vae'][cam]:+.3f}" if "vae" in explained else "")
                  + " (1 = the real change o_t -> o_t+k, 0 = none, as copying the frame)")
    print(f"action MSE vs demo:      {' '.join(f'{v:6.3f}' for v in result['action_mse_vs_demo'])}")
    if "next_obs_reliance" in result:
        r = result["next_obs_reliance"]
        print(f"policy given o_t+k: real {r['real']:.3f}, another window's {r['shuffled']:.3f}, none {r['null']:.3f}, "
              f"coupled {r['coupled']:.3f} (action MSE vs demo)")
    if "prediction_gates" in result:
        print(f"prediction gates:        {format_gates(result['prediction_gates'])} "
              f"(tanh g per attention layer: the weight the policy gives the prediction)")
    print(f"wrote {Path(result['plot']).parent / 'diagnose.json'}")
    return 0
