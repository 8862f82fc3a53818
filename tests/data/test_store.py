"""Episode store: round trip, validation, crash safety of appends, and corruption reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dapolicy.data import store as store_mod
from dapolicy.data.store import Episode, EpisodeStore, StoreError
from dapolicy.spec import EnvSpec

SPEC = EnvSpec(name="toy", cameras=("top", "wrist"), image_size=8, action_dim=2, proprio_dim=3, max_steps=50,
               action_low=(-1.0, -1.0), action_high=(1.0, 1.0))


def make_episode(length: int, seed: int, source: str = "expert", success: bool = True) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(
        images={c: rng.integers(0, 256, (length, 8, 8, 3), dtype=np.uint8) for c in SPEC.cameras},
        proprio=rng.standard_normal((length, 3)).astype(np.float32),
        action=rng.uniform(-1, 1, (length, 2)).astype(np.float32),
        meta={"source": source, "seed": seed, "success": success, "note": np.float32(0.5)},
    )


def assert_same(a: Episode, b: Episode) -> None:
    assert set(a.images) == set(b.images)
    for c in a.images:
        np.testing.assert_array_equal(a.images[c], b.images[c])
    np.testing.assert_array_equal(a.proprio, b.proprio)
    np.testing.assert_array_equal(a.action, b.action)


@pytest.fixture
def filled(tmp_path: Path, monkeypatch) -> tuple[Path, list[Episode]]:
    monkeypatch.setattr(store_mod, "_IMAGE_CHUNK_BYTES", 32 * 8 * 8 * 3)  # 32-frame image chunks
    path = tmp_path / "store"
    st = EpisodeStore.create(path, SPEC)
    eps = [make_episode(5, 0), make_episode(3, 1, "random", False), make_episode(70, 2, "noisy_expert", False),
           make_episode(4, 3, "expert", False)]
    for ep in eps:
        st.append_episode(ep)
    return path, eps


# ------------------------------------------------------------------------------------------- round trip


def test_round_trip(filled: tuple[Path, list[Episode]]) -> None:
    path, eps = filled
    st = EpisodeStore.open(path, spec=SPEC, verify=True)
    assert len(st) == 4 and st.num_frames == 82
    assert st.spec == SPEC
    assert [m["source"] for m in st.meta] == ["expert", "random", "noisy_expert", "expert"]
    assert [m["length"] for m in st.meta] == [5, 3, 70, 4]
    assert st.meta[0]["note"] == 0.5 and st.meta[1]["success"] is False
    for i, ep in enumerate(eps):
        assert_same(st.read_episode(i), ep)


def test_load_selects_and_concatenates(filled: tuple[Path, list[Episode]]) -> None:
    path, eps = filled
    st = EpisodeStore.open(path)
    data = st.load()
    assert data.images.shape == (82, 2, 8, 8, 3) and data.images.dtype == np.uint8
    assert data.proprio.dtype == np.float32 and data.action.shape == (82, 2)
    np.testing.assert_array_equal(data.episode_ends, [5, 8, 78, 82])
    np.testing.assert_array_equal(data.images[8:78, 1], eps[2].images["wrist"])  # cameras in spec order
    np.testing.assert_array_equal(data.action[data.episode_slice(3)], eps[3].action)

    experts = st.load(sources=("expert",))
    np.testing.assert_array_equal(experts.episode_ends, [5, 9])
    assert [m["store_index"] for m in experts.meta] == [0, 3]
    good = st.load(sources="expert", success_only=True)
    assert good.num_episodes == 1 and good.num_frames == 5
    dyn = st.load(sources=("random", "noisy_expert"))
    np.testing.assert_array_equal(dyn.episode_ends, [3, 73])
    empty = st.load(sources=("random",), success_only=True)
    assert empty.images.shape == (0, 2, 8, 8, 3) and empty.num_episodes == 0
    with pytest.raises(ValueError, match="unknown source"):
        st.load(sources=("human",))


def test_open_finds_store_inside_collect_dir(tmp_path: Path) -> None:
    st = EpisodeStore.create(tmp_path / "run" / "episodes.zarr", SPEC)
    st.append_episode(make_episode(2, 0))
    assert len(EpisodeStore.open(tmp_path / "run")) == 1


def test_create_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("hi")
    with pytest.raises(FileExistsError):
        EpisodeStore.create(tmp_path / "x", SPEC)


@pytest.mark.parametrize("mutate, match", [
    (lambda e: e.images.update(top=e.images["top"][..., :2]), r"images\['top'\]: expected uint8 .*\[T, 8, 8, 3\]"),
    (lambda e: e.images.update(top=e.images["top"].astype(np.float32)), r"images\['top'\]"),
    (lambda e: e.images.pop("wrist"), r"missing \['wrist'\]"),
    (lambda e: setattr(e, "action", e.action[:, :1]), r"action: expected .*\[T, 2\]"),
    (lambda e: setattr(e, "proprio", e.proprio[:-1]), r"differ in length"),
    (lambda e: e.action.__setitem__((2, 1), np.nan), r"action: contains NaN or inf \(first at frame 2, dim 1\)"),
    (lambda e: e.proprio.__setitem__((0, 0), np.inf), r"proprio: contains NaN or inf"),
    (lambda e: e.meta.update(source="human"), r"meta\['source'\]"),
    (lambda e: e.meta.pop("seed"), r"meta\['seed'\]"),
    (lambda e: e.meta.update(success=1), r"meta\['success'\]"),
])
def test_append_validates(tmp_path: Path, mutate, match: str) -> None:
    st = EpisodeStore.create(tmp_path / "s", SPEC)
    ep = make_episode(4, 0)
    mutate(ep)
    with pytest.raises(ValueError, match=match):
        st.append_episode(ep)
    assert len(EpisodeStore.open(tmp_path / "s")) == 0


# ------------------------------------------------------------------------------------------ atomicity


def test_crash_before_publish_keeps_store_readable(filled: tuple[Path, list[Episode]], monkeypatch) -> None:
    path, eps = filled
    st = EpisodeStore.open(path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while publishing")

    monkeypatch.setattr(store_mod, "_atomic_write_json", crash)  # arrays written and renamed, index not
    with pytest.raises(KeyboardInterrupt):
        st.append_episode(make_episode(6, 99))
    monkeypatch.undo()
    assert (path / "episodes" / "ep_000004").is_dir()  # the unpublished leftover is on disk ...

    reopened = EpisodeStore.open(path, verify=True)  # ... but invisible
    assert len(reopened) == 4
    new = make_episode(7, 100)
    assert reopened.append_episode(new) == 4
    again = EpisodeStore.open(path, verify=True)
    assert len(again) == 5 and again.meta[4]["seed"] == 100
    assert_same(again.read_episode(4), new)
    assert_same(again.read_episode(0), eps[0])


def test_half_written_staging_is_ignored_and_cleaned(filled: tuple[Path, list[Episode]]) -> None:
    path, _ = filled
    junk = path / ".staging" / "ep_000004.deadbeef" / "images"
    junk.mkdir(parents=True)
    (junk / "zarr.json").write_text("{trunc")
    assert len(EpisodeStore.open(path)) == 4
    EpisodeStore.open(path).append_episode(make_episode(3, 7))
    assert not (path / ".staging" / "ep_000004.deadbeef").exists()
    assert len(EpisodeStore.open(path, verify=True)) == 5


def test_killed_process_mid_append(filled: tuple[Path, list[Episode]]) -> None:
    """A real SIGKILL while the episode's arrays are being written."""
    path, _ = filled
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np, zarr
        from dapolicy.data.store import Episode, EpisodeStore
        st = EpisodeStore.open({str(path)!r})
        calls = []
        real = zarr.Group.create_array
        def dying(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **k)
        zarr.Group.create_array = dying
        z = np.zeros
        st.append_episode(Episode(images={{"top": z((5, 8, 8, 3), np.uint8), "wrist": z((5, 8, 8, 3), np.uint8)}},
                                  proprio=z((5, 3), np.float32), action=z((5, 2), np.float32),
                                  meta={{"source": "random", "seed": 5, "success": False}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    st = EpisodeStore.open(path, verify=True)
    assert len(st) == 4
    st.append_episode(make_episode(2, 8))
    assert len(EpisodeStore.open(path, verify=True)) == 5


# ------------------------------------------------------------------------------------------ corruption


def _chunk_files(path: Path, key: str, array: str) -> list[Path]:
    return sorted(p for p in (path / "episodes" / key / array / "c").rglob("*") if p.is_file())


def test_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no episode store"):
        EpisodeStore.open(tmp_path / "nope")


def test_missing_index(filled: tuple[Path, list[Episode]]) -> None:
    path, _ = filled
    (path / "index.json").unlink()
    with pytest.raises(StoreError, match="missing index.json"):
        EpisodeStore.open(path)


def test_truncated_index(filled: tuple[Path, list[Episode]]) -> None:
    path, _ = filled
    text = (path / "index.json").read_text()
    (path / "index.json").write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match="not valid JSON"):
        EpisodeStore.open(path)


def test_index_refers_to_missing_episode(filled: tuple[Path, list[Episode]]) -> None:
    path, _ = filled
    shutil.rmtree(path / "episodes" / "ep_000002")
    with pytest.raises(StoreError, match=r"index refers to missing episode 2 \(ep_000002\)"):
        EpisodeStore.open(path)


def test_array_length_mismatch(filled: tuple[Path, list[Episode]]) -> None:
    path, _ = filled
    index = json.loads((path / "index.json").read_text())
    index["episodes"][1]["length"] = 9
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match=r"episode 1 .*'images/top'.*length mismatch"):
        EpisodeStore.open(path)


def test_missing_array_metadata(filled: tuple[Path, list[Episode]]) -> None:
    path, _ = filled
    (path / "episodes" / "ep_000000" / "action" / "zarr.json").unlink()
    with pytest.raises(StoreError, match=r"episode 0 \(ep_000000\): array 'action' is missing or unreadable"):
        EpisodeStore.open(path)


def test_missing_chunk(filled: tuple[Path, list[Episode]]) -> None:
    path, _ = filled
    chunks = _chunk_files(path, "ep_000002", "images/wrist")
    assert len(chunks) >= 2  # 70 frames span several chunks: the check must find the lost one
    chunks[-1].unlink()
    with pytest.raises(StoreError, match=r"'images/wrist' is missing chunk"):
        EpisodeStore.open(path)


def test_corrupt_chunk(filled: tuple[Path, list[Episode]]) -> None:
    path, _ = filled
    chunk = _chunk_files(path, "ep_000001", "proprio")[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    st = EpisodeStore.open(path)  # metadata is fine: the cheap check passes
    with pytest.raises(StoreError, match=r"episode 1 .*'proprio' has an unreadable chunk"):
        st.read_episode(1)
    with pytest.raises(StoreError, match="unreadable chunk"):
        EpisodeStore.open(path, verify=True)
    with pytest.raises(StoreError, match="unreadable chunk"):
        st.load()


def test_wrong_spec(filled: tuple[Path, list[Episode]]) -> None:
    path, _ = filled
    other = EnvSpec(**{**SPEC.__dict__, "image_size": 16})
    with pytest.raises(StoreError, match="wrong spec"):
        EpisodeStore.open(path, spec=other)
    index = json.loads((path / "index.json").read_text())
    index["spec"]["image_size"] = 16  # the index now disagrees with the arrays on disk
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="wrong spec"):
        EpisodeStore.open(path)
    del index["spec"]["cameras"]
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="invalid env spec"):
        EpisodeStore.open(path)


def test_store_error_is_value_error() -> None:
    assert issubclass(StoreError, ValueError)
    assert os.path.basename(store_mod.COLLECT_STORE_NAME) == "episodes.zarr"
