"""`dap import diffusion-policy`: zarr replay buffers (written here with zarr, in Diffusion Policy's v2 format, as
a folder and as a .zarr.zip) are imported and checked; keys map by option; bad input fails in one line."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from dapolicy.cli import main as cli_main
from dapolicy.data.foreign import DatasetFormatError, ImportConfig, fit_square
from dapolicy.data.replay_buffer import import_replay_buffer
from dapolicy.data.store import EpisodeStore

ENDS = np.array([5, 9, 16], np.int64)


def make_buffer(path: Path, seed: int = 0, umi: bool = False, **overrides: np.ndarray) -> dict[str, np.ndarray]:
    """PushT-like (img 20x20, state [N,2], action [N,2]) or UMI-like (camera0_rgb 12x16, robot0_eef_pos [N,3],
    robot0_gripper_width [N,1], per-episode meta/is_random, per-frame data/success) arrays, zarr v2."""
    rng = np.random.default_rng(seed)
    ends = overrides.pop("episode_ends", ENDS)
    n = int(ENDS[-1])
    if umi:
        arrays = {"camera0_rgb": rng.integers(0, 256, (n, 12, 16, 3), dtype=np.uint8),
                  "robot0_eef_pos": rng.standard_normal((n, 3)).astype(np.float32),
                  "robot0_gripper_width": rng.uniform(0, 1, (n, 1)).astype(np.float32),
                  "action": rng.standard_normal((n, 4)).astype(np.float32),
                  "success": np.zeros(n, bool)}
        arrays["success"][ENDS[0] - 1] = True  # episode 0 succeeds at its last frame
    else:
        arrays = {"img": rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8),
                  "state": rng.uniform(0, 512, (n, 2)).astype(np.float32),
                  "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
                  "action": rng.uniform(0, 512, (n, 2)).astype(np.float32)}
    arrays.update(overrides)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    data, meta = root.create_group("data"), root.create_group("meta")
    for key, arr in arrays.items():
        data.create_array(key, data=arr, chunks=(4, *arr.shape[1:]))
    meta.create_array("episode_ends", data=ends)
    if umi:
        meta.create_array("is_random", data=np.array([False, True, False]))
    return arrays


def test_import_pusht_layout(tmp_path: Path) -> None:
    truth = make_buffer(tmp_path / "pusht.zarr")
    r = import_replay_buffer(tmp_path / "pusht.zarr", tmp_path / "out", ImportConfig(image_size=16))
    store = EpisodeStore.open(tmp_path / "out", verify=True)
    assert (r.frames, r.episodes) == (16, [0, 1, 2])
    assert store.spec.cameras == ("img",) and store.spec.proprio_dim == 2 and store.spec.action_dim == 2
    assert store.spec.name == "diffusion-policy/pusht"
    data = store.load()
    np.testing.assert_array_equal(data.episode_ends, ENDS)
    np.testing.assert_array_equal(data.proprio, truth["state"])
    np.testing.assert_array_equal(data.action, truth["action"])
    np.testing.assert_array_equal(data.images[:, 0], np.stack([fit_square(f, 16) for f in truth["img"]]))
    assert [(m["source"], m["seed"], m["success"]) for m in store.meta] == [("expert", e, True) for e in range(3)]


def test_key_mapping_sources_and_success(tmp_path: Path) -> None:
    truth = make_buffer(tmp_path / "umi.zarr", umi=True)
    cfg = ImportConfig(cameras=("wrist=camera0_rgb",), proprio=("robot0_eef_pos", "robot0_gripper_width"),
                       image_size=8, crop="pad", source_field="is_random", success_field="success")
    import_replay_buffer(tmp_path / "umi.zarr", tmp_path / "out", cfg)
    store = EpisodeStore.open(tmp_path / "out")
    assert store.spec.cameras == ("wrist",) and store.spec.proprio_dim == 4 and store.spec.action_dim == 4
    np.testing.assert_array_equal(store.load().proprio, np.concatenate([truth["robot0_eef_pos"],
                                                                        truth["robot0_gripper_width"]], axis=1))
    assert [(m["source"], m["success"]) for m in store.meta] == [("expert", True), ("random", False),
                                                                 ("expert", False)]


def test_flattened_proprio_and_zip_and_append(tmp_path: Path) -> None:
    truth = make_buffer(tmp_path / "pusht.zarr")
    zipped = tmp_path / "pusht.zarr.zip"
    with zipfile.ZipFile(zipped, "w") as z:  # Diffusion Policy ships its buffers as .zarr.zip
        for folder, _, files in os.walk(tmp_path / "pusht.zarr"):
            for f in files:
                z.write(Path(folder) / f, str((Path(folder) / f).relative_to(tmp_path / "pusht.zarr")))
    cfg = ImportConfig(proprio=("state", "keypoint"), image_size=20)
    import_replay_buffer(zipped, tmp_path / "out", cfg)
    import_replay_buffer(tmp_path / "pusht.zarr", tmp_path / "out",
                         ImportConfig(proprio=("state", "keypoint"), append=True, source="random"))
    store = EpisodeStore.open(tmp_path / "out")
    assert len(store) == 6 and store.spec.proprio_dim == 20
    assert [m["source"] for m in store.meta] == ["expert"] * 3 + ["random"] * 3
    ep = store.read_episode(4)
    np.testing.assert_array_equal(ep.proprio[:, 2:], truth["keypoint"][5:9].reshape(4, 18))
    np.testing.assert_array_equal(ep.images["img"], truth["img"][5:9])  # 20 px already: unchanged


def _corrupt_chunk(path: Path) -> None:
    (path / "data/img/1.0.0.0").write_bytes(b"\x00garbage")


BAD = {
    "no episode_ends": (lambda p: (make_buffer(p), shutil.rmtree(p / "meta/episode_ends")), "no meta/episode_ends"),
    "unsorted ends": (lambda p: make_buffer(p, episode_ends=np.array([5, 4, 16])), "strictly increasing"),
    "short array": (lambda p: make_buffer(p, state=np.zeros((12, 2), np.float32)), "differ in length"),
    "nan": (lambda p: make_buffer(p, action=np.where(np.arange(16)[:, None] == 7, np.nan, 1.0).astype(np.float32)
                                  .repeat(2, 1)), r"episode 1 \(frames 5:9\): 'action' has NaN.*frame 2"),
    "corrupt chunk": (lambda p: (make_buffer(p), _corrupt_chunk(p)), "data/img frames 0:5 are unreadable"),
    "not zarr": (lambda p: p.mkdir(), "not a readable zarr|no data/ group"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(case: str, tmp_path: Path) -> None:
    make, pattern = BAD[case]
    src = tmp_path / "buf.zarr"
    make(src)
    with pytest.raises(DatasetFormatError, match=pattern) as err:
        import_replay_buffer(src, tmp_path / "out", ImportConfig(image_size=16))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_key_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_buffer(tmp_path / "b.zarr")
    code = cli_main(["import", "diffusion-policy", str(tmp_path / "b.zarr"), "--out", str(tmp_path / "o"),
                     "--proprio", "agent_pos", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no array data/agent_pos" in err and "Traceback" not in err
    assert cli_main(["import", "diffusion-policy", str(tmp_path / "b.zarr"), "--out", str(tmp_path / "o"),
                     "--image-size", "16", "--quiet"]) == 0
    assert "imported 3 episodes, 16 frames" in capsys.readouterr().out


def test_train_steps_on_imported_buffer(tmp_path: Path) -> None:
    from dapolicy.train import train

    make_buffer(tmp_path / "b.zarr", umi=True)
    cfg = ImportConfig(proprio=("robot0_eef_pos",), image_size=32, source_field="is_random")
    import_replay_buffer(tmp_path / "b.zarr", tmp_path / "data", cfg)
    run = train(tmp_path / "data", tmp_path / "run", method="fm", config="tiny", steps=2, progress=False)
    assert (Path(run) / "model").is_dir()
