"""The memory-lean data path (`EpisodeStore.load(lazy=True)`): images come as a memory map that the sampler
gathers from exactly as from RAM; the frame cache grows with the store and is rebuilt when it does not match.
Also the all-or-nothing `append_episodes` the importers publish through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from dapolicy.data.lean import LEAN_DIR, benchmark_lean
from dapolicy.data.sampler import WindowSampler
from dapolicy.data.store import Episode, EpisodeStore, StoreError
from dapolicy.spec import EnvSpec

SPEC = EnvSpec(name="toy", cameras=("top", "wrist"), image_size=8, action_dim=2, proprio_dim=3, max_steps=50)


def episode(length: int, seed: int, source: str = "expert", success: bool = True) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(images={c: rng.integers(0, 256, (length, 8, 8, 3), dtype=np.uint8) for c in SPEC.cameras},
                   proprio=rng.standard_normal((length, 3)).astype(np.float32),
                   action=rng.uniform(-1, 1, (length, 2)).astype(np.float32),
                   meta={"source": source, "seed": seed, "success": success})


@pytest.fixture
def store(tmp_path: Path) -> EpisodeStore:
    st = EpisodeStore.create(tmp_path / "store", SPEC)
    st.append_episodes([episode(5, 0), episode(9, 1, "random", False), episode(30, 2), episode(4, 3, "expert", False)])
    return st


def assert_same(a, b) -> None:
    np.testing.assert_array_equal(np.asarray(a.images), b.images)
    np.testing.assert_array_equal(a.proprio, b.proprio)
    np.testing.assert_array_equal(a.action, b.action)
    np.testing.assert_array_equal(a.episode_ends, b.episode_ends)
    assert a.meta == b.meta


def test_lazy_load_is_a_memmap_equal_to_ram_and_gathers_the_same(store: EpisodeStore) -> None:
    ram, lean = store.load(), store.load(lazy=True)
    assert isinstance(lean.images, np.memmap) and not lean.images.flags.writeable
    assert_same(lean, ram)
    sampler = WindowSampler(ram.episode_ends, n_obs=2, horizon=6, next_obs_offset=3)
    ids = np.random.default_rng(0).integers(0, len(sampler), 64)
    a, b = sampler.gather(ram.arrays(), ids), sampler.gather(lean.arrays(), ids)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        assert not isinstance(b[key], np.memmap)  # a batch is an ordinary in-memory array


@pytest.mark.parametrize("select", [dict(sources=("expert",)), dict(success_only=True), dict(episodes=[2, 0]),
                                    dict(sources="random")])
def test_selections(store: EpisodeStore, select: dict) -> None:
    assert_same(store.load(lazy=True, **select), store.load(**select))


def test_cache_is_reused_extended_and_rebuilt(store: EpisodeStore) -> None:
    store.load(lazy=True)
    (data_file,) = (store.path / LEAN_DIR).glob("*.u8")
    side = data_file.with_suffix(".json")
    inode = data_file.stat().st_ino
    store.load(lazy=True)
    assert data_file.stat().st_ino == inode  # reused
    store.append_episode(episode(6, 4))
    grown = store.load(lazy=True)
    assert data_file.stat().st_ino == inode and len(json.loads(side.read_text())["keys"]) == 5  # extended in place
    assert_same(grown, store.load())
    side.write_text("{not json")  # a damaged sidecar: rebuilt, not trusted
    assert_same(store.load(lazy=True), store.load())
    with open(data_file, "r+b") as f:  # a data file shorter than the sidecar says: rebuilt
        f.truncate(100)
    assert_same(store.load(lazy=True), store.load())


def test_other_cache_dir_empty_selection_and_unwritable_dir(store: EpisodeStore, tmp_path: Path) -> None:
    lean = store.load(lazy=True, lean_dir=tmp_path / "cache")
    assert Path(lean.images.filename).parent == tmp_path / "cache" and not (store.path / LEAN_DIR).exists()
    empty = store.load(sources=("noisy_expert",), lazy=True)
    assert empty.images.shape == (0, 2, 8, 8, 3)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="lean image cache"):
        store.load(lazy=True, lean_dir=tmp_path / "afile" / "sub")


def test_append_episodes_is_all_or_nothing(store: EpisodeStore) -> None:
    def bad() -> Iterator[Episode]:
        yield episode(3, 10)
        yield episode(3, 11)
        raise ValueError("input broke part-way")

    with pytest.raises(ValueError, match="part-way"):
        store.append_episodes(bad())
    reopened = EpisodeStore.open(store.path, verify=True)
    assert len(reopened) == 4
    assert sorted(p.name for p in (store.path / "episodes").iterdir()) == [f"ep_{i:06d}" for i in range(4)]
    assert not (store.path / ".staging").exists()
    nan = episode(3, 12)
    nan.proprio[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.append_episodes([episode(3, 13), nan])
    assert len(EpisodeStore.open(store.path)) == 4
    assert store.append_episodes([episode(3, 14), episode(2, 15)]) == [4, 5]
    assert len(EpisodeStore.open(store.path, verify=True)) == 6


def test_benchmark_runs(tmp_path: Path) -> None:
    r = benchmark_lean(tmp_path / "bench", n_episodes=3, episode_length=20, image_size=16, seconds=0.05)
    assert r["frames"] == 60 and r["lean_windows_per_s"] > 0 and r["ram_windows_per_s"] > 0
    assert r["lean_load_peak_mb"] < r["ram_load_peak_mb"]
