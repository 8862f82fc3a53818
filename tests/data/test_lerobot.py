"""`dap import lerobot` / `dap export lerobot`: a LeRobotDataset v3 folder written here with pyarrow and PyAV
(videos included) is imported and checked frame by frame; bad input fails in one line and writes nothing;
export -> import round-trips exactly; a few training steps run on an imported store."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

from dapolicy.cli import main as cli_main  # noqa: E402
from dapolicy.data.foreign import DatasetFormatError, ImportConfig, fit_square  # noqa: E402
from dapolicy.data.lerobot import ExportConfig, export_lerobot, import_lerobot  # noqa: E402
from dapolicy.data.store import Episode, EpisodeStore  # noqa: E402
from dapolicy.spec import EnvSpec  # noqa: E402

FPS = 10
LENGTHS = (6, 4, 5)
FRONT_HW = (24, 32)  # a non-square video camera
WRIST_HW = (16, 16)  # an "image" feature: PNG bytes inside the parquet


def _encode(path: Path, frames: np.ndarray, start: int = 0) -> None:
    """Lossless H.264 (RGB, qp 0), frame k at (start + k) / FPS."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264rgb", rate=FPS, options={"qp": "0", "g": "2"})
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "rgb24"
        for k, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = start + k, Fraction(1, FPS)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _png(frame: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def make_lerobot(root: Path, seed: int = 0, nan_action: bool = False) -> dict[str, Any]:
    """Three episodes: data of episodes 0-1 in data file 0 and episode 2 in file 1; the front video holds
    episodes 0-1 back to back (file 0) and episode 2 in file 1; the wrist camera is PNG inside the parquet."""
    rng = np.random.default_rng(seed)
    eps = []
    for n in LENGTHS:
        eps.append({"front": rng.integers(0, 256, (n, *FRONT_HW, 3), dtype=np.uint8),
                    "wrist": rng.integers(0, 256, (n, *WRIST_HW, 3), dtype=np.uint8),
                    "state": rng.standard_normal((n, 3)).astype(np.float32),
                    "action": rng.uniform(-1, 1, (n, 2)).astype(np.float32)})
    if nan_action:
        eps[1]["action"][2, 1] = np.nan
    files = {0: [0, 1], 1: [2]}
    ep_rows, index = [], 0
    for file, members in files.items():
        cols: dict[str, list] = {k: [] for k in ("observation.state", "action", "observation.images.wrist",
                                                 "timestamp", "frame_index", "episode_index", "index",
                                                 "task_index")}
        in_file = 0
        for e in members:
            n = LENGTHS[e]
            cols["observation.state"] += eps[e]["state"].tolist()
            cols["action"] += eps[e]["action"].tolist()
            cols["observation.images.wrist"] += [{"bytes": _png(f), "path": None} for f in eps[e]["wrist"]]
            cols["timestamp"] += (np.arange(n) / FPS).astype(np.float32).tolist()
            cols["frame_index"] += list(range(n))
            cols["episode_index"] += [e] * n
            cols["index"] += list(range(index, index + n))
            cols["task_index"] += [e % 2] * n
            ep_rows.append({"episode_index": e, "tasks": [["push", "lift"][e % 2]], "length": n,
                            "data/chunk_index": 0, "data/file_index": file, "dataset_from_index": index,
                            "dataset_to_index": index + n, "videos/observation.images.front/chunk_index": 0,
                            "videos/observation.images.front/file_index": file,
                            "videos/observation.images.front/from_timestamp": in_file / FPS,
                            "videos/observation.images.front/to_timestamp": (in_file + n) / FPS,
                            "is_random": e == 1, "stats/action/min": [0.0, 0.0]})
            index += n
            in_file += n
        path = root / f"data/chunk-000/file-{file:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), path)
        _encode(root / f"videos/observation.images.front/chunk-000/file-{file:03d}.mp4",
                np.concatenate([eps[e]["front"] for e in members]))
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ep_rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": [0, 1], "task": ["push", "lift"]}), root / "meta/tasks.parquet")
    features = {
        "observation.images.front": {"dtype": "video", "shape": [*FRONT_HW, 3],
                                     "names": ["height", "width", "channels"]},
        "observation.images.wrist": {"dtype": "image", "shape": [*WRIST_HW, 3],
                                     "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [3], "names": None},
        "action": {"dtype": "float32", "shape": [2], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        **{k: {"dtype": "int64", "shape": [1], "names": None}
           for k in ("frame_index", "episode_index", "index", "task_index")}}
    info = {"codebase_version": "v3.0", "robot_type": "toyarm", "fps": FPS, "total_episodes": 3,
            "total_frames": sum(LENGTHS), "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": features}
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "meta/stats.json").write_text(json.dumps({"action": {"min": [-1.0, -1.0], "max": [1.0, 1.0]}}))
    return {"episodes": eps}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("lerobot") / "toy"
    return root, make_lerobot(root)


def _only_store(out: Path) -> EpisodeStore:
    assert sorted(p.name for p in out.iterdir()) == ["episodes.zarr"]  # no temp folders left behind
    return EpisodeStore.open(out, verify=True)


# ---------------------------------------------------------------------------------------------- import


def test_import_maps_features_and_frames(dataset, tmp_path: Path) -> None:
    root, truth = dataset
    r = import_lerobot(root, tmp_path / "out", ImportConfig(image_size=16))
    store = _only_store(tmp_path / "out")
    assert r.frames == sum(LENGTHS) and r.episodes == [0, 1, 2]
    assert store.spec == EnvSpec(name="lerobot/toyarm", cameras=("front", "wrist"), image_size=16, action_dim=2,
                                 proprio_dim=3, max_steps=6, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    data = store.load()
    np.testing.assert_array_equal(data.episode_ends, np.cumsum(LENGTHS))
    for e, ep in enumerate(truth["episodes"]):
        got = store.read_episode(e)
        np.testing.assert_array_equal(got.proprio, ep["state"])
        np.testing.assert_array_equal(got.action, ep["action"])
        np.testing.assert_array_equal(got.images["wrist"], ep["wrist"])  # already 16 x 16: untouched
        want = np.stack([fit_square(f, 16, "center") for f in ep["front"]])  # the video is lossless
        np.testing.assert_array_equal(got.images["front"], want)
        assert got.meta["source"] == "expert" and got.meta["success"] is True and got.meta["seed"] == e
        assert got.meta["tasks"] == [["push", "lift"][e % 2]] and got.meta["episode_index"] == e


def test_center_crop_keeps_middle_and_pad_keeps_all() -> None:
    frame = np.zeros((4, 8, 3), np.uint8)
    frame[:, 2:6] = 200  # the middle square
    np.testing.assert_array_equal(fit_square(frame, 4, "center"), np.full((4, 4, 3), 200, np.uint8))
    padded = fit_square(frame, 8, "pad")
    assert padded.shape == (8, 8, 3) and padded[:2].max() == 0 and padded[6:].max() == 0
    np.testing.assert_array_equal(padded[2:6], frame)


def test_sources_from_flag_and_field(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    import_lerobot(root, tmp_path / "a", ImportConfig(image_size=16, source="random"))
    assert [(m["source"], m["success"]) for m in EpisodeStore.open(tmp_path / "a").meta] == [("random", False)] * 3
    import_lerobot(root, tmp_path / "b", ImportConfig(image_size=16, source_field="is_random"))
    assert [m["source"] for m in EpisodeStore.open(tmp_path / "b").meta] == ["expert", "random", "expert"]
    assert [m["success"] for m in EpisodeStore.open(tmp_path / "b").meta] == [True, False, True]


def test_key_overrides_and_pad(dataset, tmp_path: Path) -> None:
    root, truth = dataset
    cfg = ImportConfig(cameras=("hand=observation.images.wrist",), proprio=("observation.state", "action"),
                       image_size=8, crop="pad", name="mine")
    import_lerobot(root, tmp_path / "out", cfg)
    store = EpisodeStore.open(tmp_path / "out")
    assert store.spec.cameras == ("hand",) and store.spec.proprio_dim == 5 and store.spec.name == "mine"
    ep = store.read_episode(2)
    np.testing.assert_array_equal(ep.proprio, np.concatenate([truth["episodes"][2]["state"],
                                                              truth["episodes"][2]["action"]], axis=1))
    assert ep.images["hand"].shape == (5, 8, 8, 3)


def test_append_and_mismatch_leaves_store_unchanged(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    out = tmp_path / "out"
    import_lerobot(root, out, ImportConfig(image_size=16))
    r = import_lerobot(root, out, ImportConfig(append=True, source="random"))  # image size: the store's
    assert r.episodes == [3, 4, 5]
    store = _only_store(out)
    assert [m["source"] for m in store.meta] == ["expert"] * 3 + ["random"] * 3
    with pytest.raises(DatasetFormatError, match="does not match the store"):
        import_lerobot(root, out, ImportConfig(append=True, cameras=("observation.images.front",)))
    assert len(EpisodeStore.open(out)) == 6
    with pytest.raises(FileExistsError, match="--append"):
        import_lerobot(root, out, ImportConfig(image_size=16))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    "missing info": (lambda r: (r / "meta/info.json").unlink(), "missing .*info.json"),
    "old version": (lambda r: (r / "meta/info.json").write_text(json.dumps({"codebase_version": "v2.1"})),
                    "v2.1"),
    "corrupt parquet": (lambda r: (r / "data/chunk-000/file-001.parquet").write_bytes(b"PAR1garbage"),
                        "not a readable parquet"),
    "truncated video": (lambda r: _truncate(r / "videos/observation.images.front/chunk-000/file-000.mp4"),
                        "video"),
    "short video": (lambda r: _encode(r / "videos/observation.images.front/chunk-000/file-001.mp4",
                                      np.zeros((3, *FRONT_HW, 3), np.uint8)), "video ends before"),
    "missing rows": (lambda r: pq.write_table(pq.read_table(r / "data/chunk-000/file-001.parquet").slice(0, 3),
                                              r / "data/chunk-000/file-001.parquet"), "holds 3 frames"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(case: str, tmp_path: Path) -> None:
    root = tmp_path / "src"
    make_lerobot(root)
    damage, pattern = BAD_INPUTS[case]
    damage(root)
    out = tmp_path / "out"
    with pytest.raises(DatasetFormatError, match=pattern) as err:
        import_lerobot(root, out, ImportConfig(image_size=16))
    assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())


def test_nan_and_missing_key_are_named(tmp_path: Path) -> None:
    make_lerobot(tmp_path / "nan", nan_action=True)
    with pytest.raises(DatasetFormatError, match=r"episode 1: 'action' has NaN or inf \(first at frame 2, dim 1\)"):
        import_lerobot(tmp_path / "nan", tmp_path / "o1", ImportConfig(image_size=16))
    with pytest.raises(DatasetFormatError, match="no feature 'observation.joints'"):
        import_lerobot(tmp_path / "nan", tmp_path / "o2", ImportConfig(proprio=("observation.joints",)))


def test_cli_import_and_one_line_errors(dataset, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, _ = dataset
    out = tmp_path / "out"
    assert cli_main(["import", "lerobot", str(root), "--out", str(out), "--image-size", "16", "--quiet",
                     "--camera", "observation.images.front", "--source-field", "is_random"]) == 0
    assert "imported 3 episodes, 15 frames" in capsys.readouterr().out
    assert EpisodeStore.open(out).spec.cameras == ("front",)
    assert cli_main(["import", "lerobot", str(root), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dap import: error:") and "Traceback" not in err
    assert cli_main(["import", "lerobot", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["export", "lerobot", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "dap export: error: no episode store" in err


# ---------------------------------------------------------------------------------------------- export


def _store(path: Path, size: int = 16) -> EpisodeStore:
    spec = EnvSpec(name="toy", cameras=("top", "wrist"), image_size=size, action_dim=2, proprio_dim=3,
                   max_steps=20, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    store = EpisodeStore.create(path, spec)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size]
    for i, n in enumerate((7, 3, 9, 5)):
        smooth = ((xx + yy)[None, :, :, None] * 4 + np.arange(n)[:, None, None, None] * 3
                  + np.array([0, 60, 120])).astype(np.uint8)  # gradients: what a lossy codec is judged on
        store.append_episode(Episode(
            images={"top": smooth, "wrist": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)},
            proprio=rng.standard_normal((n, 3)).astype(np.float32),
            action=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
            meta={"source": ("expert", "random", "noisy_expert", "expert")[i], "seed": 10 + i, "success": i != 3,
                  "task": "stack" if i == 2 else None, "score": i * 0.25}))
    return store


def _mp4_takes(codec: str) -> bool:
    import io

    with av.open(io.BytesIO(), "w", format="mp4") as c:
        try:
            c.add_stream(codec, rate=10)
        except ValueError:
            return False
    return True


@pytest.mark.parametrize("codec", ["lossless", "ffv1"])
def test_export_import_round_trip_is_exact(codec: str, tmp_path: Path) -> None:
    if codec == "ffv1" and not _mp4_takes("ffv1"):
        pytest.skip(f"PyAV {av.__version__} cannot put FFV1 into mp4 (needs av>=16)")
    store = _store(tmp_path / "store")
    r = export_lerobot(store.path, tmp_path / "lr", ExportConfig(codec=codec, frames_per_file=12))
    assert (r.episodes, r.frames) == (4, 24)
    assert len(list((tmp_path / "lr/data/chunk-000").iterdir())) == 3  # 7+3 | 9 | 5 frames per file
    import_lerobot(tmp_path / "lr", tmp_path / "back")
    back = EpisodeStore.open(tmp_path / "back")
    assert back.spec == store.spec and back.meta == store.meta
    for i in range(len(store)):
        a, b = store.read_episode(i), back.read_episode(i)
        for cam in store.spec.cameras:
            np.testing.assert_array_equal(a.images[cam], b.images[cam])
        np.testing.assert_array_equal(a.proprio, b.proprio)
        np.testing.assert_array_equal(a.action, b.action)


def test_lossy_export_within_tolerance(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    export_lerobot(store.path, tmp_path / "lr", ExportConfig(codec="h264"))
    import_lerobot(tmp_path / "lr", tmp_path / "back")
    back = EpisodeStore.open(tmp_path / "back")
    for i in range(len(store)):
        a, b = store.read_episode(i), back.read_episode(i)
        err = np.abs(a.images["top"].astype(int) - b.images["top"].astype(int))
        assert err.mean() < 2.0, err.mean()  # docs/your-data.md: smooth images, crf 18
        np.testing.assert_array_equal(a.action, b.action)


def test_export_layout_is_lerobot_v3(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    export_lerobot(store.path, tmp_path / "lr", ExportConfig(fps=5))
    root = tmp_path / "lr"
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 5 and info["total_frames"] == 24
    assert info["features"]["observation.images.top"]["dtype"] == "video"
    assert info["features"]["observation.state"]["shape"] == [3]
    assert info["features"]["observation.images.top"]["info"]["video.codec"] == "h264"
    stats = json.loads((root / "meta/stats.json").read_text())
    assert np.asarray(stats["observation.images.top"]["mean"]).shape == (3, 1, 1)
    assert stats["action"]["count"] == [24] and len(stats["action"]["q99"]) == 2
    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    assert tasks.column("task").to_pylist() == ["toy", "stack"]
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["dataset_from_index"] for e in eps] == [0, 7, 10, 19]
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert data.schema.field("observation.state").type == pa.list_(pa.float32(), 3)
    assert data.column("index").to_pylist() == list(range(24))


def test_exported_video_reads_by_timestamp_like_lerobot(tmp_path: Path) -> None:
    """LeRobot's PyAV path: seek to the keyframe before from_timestamp + t, decode on, take the frame within
    1e-4 s. Every frame of every episode must come back exactly."""
    store = _store(tmp_path / "store")
    export_lerobot(store.path, tmp_path / "lr", ExportConfig(fps=10))
    eps = pq.read_table(tmp_path / "lr/meta/episodes/chunk-000/file-000.parquet").to_pylist()
    path = tmp_path / "lr/videos/observation.images.wrist/chunk-000/file-000.mp4"
    for e, row in enumerate(eps):
        truth = store.read_episode(e).images["wrist"]
        for j in (0, len(truth) // 2, len(truth) - 1):
            q = row["videos/observation.images.wrist/from_timestamp"] + j / 10
            with av.open(str(path)) as c:
                s = c.streams.video[0]
                c.seek(round(q / s.time_base) - 1, backward=True, any_frame=False, stream=s)
                frame = next(f for f in c.decode(s) if abs(float(f.pts * s.time_base) - q) <= 1e-4)
                np.testing.assert_array_equal(frame.to_ndarray(format="rgb24"), truth[j])


def test_export_refuses_non_empty_out_and_unknown_codec(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    with pytest.raises(FileExistsError):
        export_lerobot(store.path, tmp_path / "full")
    with pytest.raises(DatasetFormatError, match="unknown codec"):
        export_lerobot(store.path, tmp_path / "o", ExportConfig(codec="gif"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "store"]


# ---------------------------------------------------------------------------------------------- training


def test_train_steps_on_imported_store(dataset, tmp_path: Path) -> None:
    from dapolicy.train import train

    root, _ = dataset
    import_lerobot(root, tmp_path / "data", ImportConfig(image_size=32, source_field="is_random"))
    run = train(tmp_path / "data", tmp_path / "run", method="fm", config="tiny", steps=2, progress=False)
    assert (Path(run) / "model").is_dir()
