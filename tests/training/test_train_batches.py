import numpy as np

from dapolicy.training.batches import EpochIndexer, frames_of, split_episodes


def test_frames_of() -> None:
    ends = np.array([3, 5, 9])
    assert frames_of(ends, np.array([0, 2])).tolist() == [0, 1, 2, 5, 6, 7, 8]
    assert frames_of(ends, np.array([], dtype=np.int64)).size == 0


def test_epoch_indexer_is_a_pure_function_of_the_step() -> None:
    ids = np.arange(10, 20)
    idx = EpochIndexer(ids, batch_size=4, seed=0, stage="policy")
    batches = [idx(s) for s in range(5)]  # 20 positions = two full epochs
    flat = np.concatenate(batches)
    assert sorted(flat[:10]) == list(ids) and sorted(flat[10:]) == list(ids)  # each id once per epoch
    fresh = EpochIndexer(ids, batch_size=4, seed=0, stage="policy")
    assert np.array_equal(fresh(3), batches[3])  # no hidden state: step 3 without steps 0-2
    assert not np.array_equal(EpochIndexer(ids, 4, 1, "policy")(0), batches[0])
    assert not np.array_equal(EpochIndexer(ids, 4, 0, "vae")(0), batches[0])


def test_validation_split_is_stable_and_never_empty_or_total() -> None:
    meta = [{"source": "expert", "seed": i} for i in range(40)]
    eps = np.arange(40)
    train, val = split_episodes(meta, eps, 0.1)
    assert len(val) == 4 and len(train) == 36 and not set(train) & set(val)
    assert np.array_equal(split_episodes(meta, eps, 0.1)[1], val)
    # the same episode stays held out when the selection is a subset containing it
    sub = np.sort(np.concatenate([val[:1], train[:5]]))
    assert val[0] in split_episodes(meta, sub, 0.1)[1]
    assert len(split_episodes(meta, eps[:2], 0.9)[1]) == 1  # never all
    assert len(split_episodes(meta, eps[:3], 0.01)[1]) == 1  # at least one
    assert len(split_episodes(meta, eps[:1], 0.5)[1]) == 0  # a single episode trains
    assert len(split_episodes(meta, eps, 0.0)[1]) == 0
