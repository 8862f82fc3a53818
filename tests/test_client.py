"""`dapolicy.client` and `dapolicy.wire` without a server: the codec, the chunk broker (against a scripted fake
client whose replies encode which request and which position an action came from), the latency report, and
that the robot side imports no torch. Tests against a real server are in test_serve.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest

from dapolicy import wire
from dapolicy.client import (
    ActionChunkBroker,
    LatencyLog,
    PolicyClient,
    Timing,
    chunk_seed,
    format_latency,
    frame_from_obs,
)

T_O, H, T_A, S = 2, 16, 8, 8


# ----------------------------------------------------------------------------------------------- import hygiene
def test_client_imports_no_torch():
    """The robot computer has no torch: importing the client must not pull it (or any torch-using module)."""
    code = ("import sys, dapolicy.client, dapolicy.wire; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') "
            "or m.startswith('dapolicy.policies') or m.startswith('dapolicy.nn')); "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------------------------------------- codec
@pytest.mark.parametrize("dtype", wire.ARRAY_DTYPES)
def test_array_roundtrip_every_dtype(dtype):
    rng = np.random.default_rng(0)
    a = (rng.uniform(0, 100, (3, 4, 5)) > 50) if dtype == "bool" else rng.uniform(0, 100, (3, 4, 5)).astype(dtype)
    back = wire.unpack(wire.pack({"a": a}))["a"]
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
    assert back.flags.writeable and back.flags.owndata


def test_roundtrip_nested_views_big_endian_and_empty():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    msg = {"type": "x", "nested": {"view": base[:, ::2], "list": [np.float32(1.5), np.int64(3), (1, 2)]},
           "big": np.arange(5, dtype=">i4"), "empty": np.zeros((0, 3), np.uint8), "scalar": np.array(2.5),
           "bytes": b"\x00\x01"}
    out = wire.unpack(wire.pack(msg))
    assert np.array_equal(out["nested"]["view"], base[:, ::2])
    assert out["nested"]["list"] == [1.5, 3, [1, 2]]
    assert out["big"].dtype == np.int32 and np.array_equal(out["big"], np.arange(5))
    assert out["empty"].shape == (0, 3) and out["scalar"].shape == () and float(out["scalar"]) == 2.5
    assert out["bytes"] == b"\x00\x01"


def test_pack_refuses_unsupported_values():
    with pytest.raises(wire.WireError, match="dtype"):
        wire.pack({"a": np.array(["x"], dtype=object)})
    with pytest.raises(wire.WireError, match="complex"):
        wire.pack({"a": np.zeros(2, np.complex64)})
    with pytest.raises(wire.WireError, match="cannot encode"):
        wire.pack({"a": object()})
    with pytest.raises(wire.WireError, match="dict"):
        wire.pack([1, 2])  # type: ignore[arg-type]


def _raw(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize("array, match", [
    ({"__ndarray__": 1, "dtype": "float32", "shape": [2], "data": b"\x00" * 7}, "needs 8 bytes"),
    ({"__ndarray__": 1, "dtype": "object", "shape": [1], "data": b"\x00" * 8}, "not supported"),
    ({"__ndarray__": 1, "dtype": "float32", "shape": [-1], "data": b""}, "non-negative"),
    ({"__ndarray__": 1, "dtype": "float32", "shape": "2", "data": b""}, "shape"),
    ({"__ndarray__": 1, "dtype": "float32", "shape": [True], "data": b"\x00" * 4}, "shape"),
    ({"__ndarray__": 1, "dtype": "uint8", "shape": [1] * 40, "data": b"\x00"}, "at most"),
    ({"__ndarray__": 1, "dtype": "uint8", "shape": [1], "data": "x"}, "bytes"),
    ({"__ndarray__": 1, "dtype": "uint8", "shape": [1], "data": b"\x00", "evil": 1}, "unexpected"),
    ({"__ndarray__": 1, "dtype": "uint8", "shape": [2**40, 2**40], "data": b""}, "needs"),
])
def test_unpack_rejects_forged_arrays(array, match):
    with pytest.raises(wire.WireError, match=match):
        wire.unpack(_raw({"type": "infer", "obs": {"images": array}}))


def test_unpack_rejects_garbage_with_wire_error_only():
    rng = np.random.default_rng(0)
    for n in [0, 1, 2, 5, 17, 100, 1000]:
        for _ in range(30):
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            try:
                out = wire.unpack(data)
            except wire.WireError:
                continue
            assert isinstance(out, dict)  # random bytes that happen to be a map are still just a map
    with pytest.raises(wire.WireError, match="text"):
        wire.unpack("hello")
    with pytest.raises(wire.WireError, match="map"):
        wire.unpack(_raw([1, 2, 3]))
    with pytest.raises(wire.WireError, match="malformed"):
        wire.unpack(_raw({1: 2}))  # non-string keys
    with pytest.raises(wire.WireError, match="malformed"):
        wire.unpack(_raw({"a": 1}) + b"\x00")  # trailing bytes


# ----------------------------------------------------------------------------------------------- broker
class FakeClient:
    """Stands in for PolicyClient: chunk k's action j is [k, j] (so tests can read where an action came from).

    gate: when set, each infer waits for `gate.release()` (a slow server).
    """

    def __init__(self, n_obs: int = T_O, horizon: int = H, n_action: int = T_A, slow: bool = False) -> None:
        self.metadata = {"n_obs_steps": n_obs, "horizon": horizon, "n_action_steps": n_action, "cameras": ["top"],
                         "image_size": S, "proprio_dim": 1}
        self.requests: list[dict] = []
        self.slow = slow
        self.gate = threading.Semaphore(0)
        self.lock = threading.Lock()

    def infer(self, obs, seed=None, mode=None, steps=None, return_next=False):
        if self.slow:
            assert self.gate.acquire(timeout=10), "test forgot to release a request"
        with self.lock:
            k = len(self.requests)
            self.requests.append({"proprio": obs["proprio"].copy(), "seed": seed,
                                  "images": obs["images"].copy()})
        actions = np.stack([np.full(self.metadata["horizon"], k), np.arange(self.metadata["horizon"])], -1)
        return type("R", (), {"actions": actions[None].astype(np.float32)})()


def obs_at(t: int) -> dict:
    return {"images": {"top": np.full((S, S, 3), t % 256, np.uint8)}, "proprio": np.array([t], np.float32)}


def test_broker_on_time_matches_select_action_semantics():
    """ahead=0: a chunk whenever the queue is empty, its first T_a actions, history padded at the start."""
    fake = FakeClient()
    broker = ActionChunkBroker(fake, ahead=0)
    actions = [broker.step(obs_at(t)) for t in range(2 * T_A + 3)]
    assert [tuple(a) for a in actions] == [(t // T_A, t % T_A) for t in range(2 * T_A + 3)]
    assert len(fake.requests) == 3
    # the request at tick 0 sees the first frame twice; later ones the last T_o frames
    assert fake.requests[0]["proprio"][0, :, 0].tolist() == [0, 0]
    assert fake.requests[1]["proprio"][0, :, 0].tolist() == [T_A - 1, T_A]
    assert fake.requests[0]["images"].shape == (1, T_O, 1, S, S, 3)
    stats = broker.stats()
    assert stats["ticks"] == 2 * T_A + 3 and stats["chunks"] == 3 and stats["waits"] == 3
    assert stats["background"] == 0 and stats["dropped_actions"] == 0


def test_broker_ahead_requests_early_and_aligns_the_late_chunk():
    """ahead=r: chunk of T_a + r queued; at r left the next is requested with that tick's observation; it
    arrives d ticks later and its first d actions are dropped, so re-planning stays every T_a ticks."""
    r = 3
    fake = FakeClient(slow=True)
    broker = ActionChunkBroker(fake, ahead=r)
    fake.gate.release()  # the first chunk: the robot must wait for it
    got = []
    for t in range(T_A):
        got.append(tuple(broker.step(obs_at(t))))
    # chunk 0 queued T_a + r = 11 actions; r = 3 are left at tick T_a, where the next request goes out
    assert got == [(0, j) for j in range(T_A)]
    assert len(fake.requests) == 1
    got.append(tuple(broker.step(obs_at(T_A))))  # tick 8: 3 left -> background request with obs 8
    assert got[-1] == (0, T_A)
    got.append(tuple(broker.step(obs_at(T_A + 1))))  # tick 9: still chunk 0 (request not answered)
    fake.gate.release()
    broker._pending.result(timeout=5)  # answered between tick 9 and tick 10
    got.append(tuple(broker.step(obs_at(T_A + 2))))  # tick 10: chunk 1, d = 2 -> its action 2
    assert got[-2:] == [(0, T_A + 1), (1, 2)]
    assert fake.requests[1]["proprio"][0, :, 0].tolist() == [T_A - 1, T_A]
    stats = broker.stats()
    assert stats["background"] == 1 and stats["dropped_actions"] == 2 and stats["waits"] == 1
    # the next background request fires at tick 8 + T_a = 16 (r actions left again)
    for t in range(T_A + 3, 2 * T_A):
        broker.step(obs_at(t))
    assert broker._pending is None
    broker.step(obs_at(2 * T_A))
    assert broker._pending is not None and broker._pending_tick == 2 * T_A
    fake.gate.release()
    broker.close()


def test_broker_waits_when_the_queue_runs_dry():
    """A request slower than r ticks: the robot blocks on the in-flight chunk (counted as a wait)."""
    r = 1
    fake = FakeClient(slow=True)
    broker = ActionChunkBroker(fake, ahead=r)
    fake.gate.release()
    for t in range(T_A + 1):  # tick T_a: 1 left -> background request
        broker.step(obs_at(t))
    threading.Timer(0.2, fake.gate.release).start()
    start = time.perf_counter()
    action = broker.step(obs_at(T_A + 1))  # queue empty: must wait for the chunk requested at tick T_a
    assert time.perf_counter() - start > 0.1
    assert tuple(action) == (1, 1)  # d = 1
    assert broker.stats()["waits"] == 2
    broker.close()


def test_broker_reset_discards_pending_and_seeds_chunks():
    fake = FakeClient()
    broker = ActionChunkBroker(fake, ahead=2, seed=7)
    for t in range(T_A + 1):
        broker.step(obs_at(t))
    broker.reset(seed=7)
    assert broker._pending is None and broker._tick == 0
    broker.step(obs_at(0))
    seeds = [q["seed"] for q in fake.requests]
    assert seeds[0] == seeds[-1] == chunk_seed(7, 0)  # the same episode seed replays the same noise
    assert seeds[1] == chunk_seed(7, 1) != seeds[0]
    assert chunk_seed(7, 1) != chunk_seed(8, 0)  # neighbouring episodes share no chunk noise
    broker.close()


def test_broker_checks_ahead_and_observations():
    with pytest.raises(ValueError, match=r"= \[0, 8\]"):
        ActionChunkBroker(FakeClient(), ahead=9)
    broker = ActionChunkBroker(FakeClient())
    with pytest.raises(ValueError, match="missing camera 'top'"):
        broker.step({"images": {"front": np.zeros((S, S, 3), np.uint8)}, "proprio": np.zeros(1)})
    with pytest.raises(ValueError, match="expected uint8"):
        broker.step({"images": {"top": np.zeros((S, S, 3), np.float32)}, "proprio": np.zeros(1)})
    with pytest.raises(ValueError, match="'proprio' has shape"):
        frame_from_obs({"images": {"top": np.zeros((S, S, 3), np.uint8)}, "proprio": np.zeros(3)}, ["top"], S, 1)


# ----------------------------------------------------------------------------------------------- latency, errors
def test_latency_summary_splits_model_queue_and_network():
    log = LatencyLog()
    for i in range(10):
        log.add(Timing("infer", rtt_ms=50.0 + i, server_ms=40.0, wait_ms=1.0, handle_ms=42.0))
    log.add(Timing("act", rtt_ms=2.0, server_ms=0.0, wait_ms=0.0, handle_ms=0.5))  # served from the queue
    log.add(Timing("ping", rtt_ms=1.0, server_ms=0.0, wait_ms=0.0, handle_ms=0.1))
    s = log.summary()
    assert s["n"] == 10 and s["server_ms"]["p50"] == 40.0 and s["rtt_ms"]["max"] == 59.0
    assert s["other_ms"]["p50"] == pytest.approx(13.5)
    assert log.summary(model_only=False)["n"] == 11
    table = format_latency(s)
    assert "round trip" in table and "network + serialisation" in table and "59.0" in table


def test_connecting_to_nothing_names_the_address():
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        PolicyClient(f"ws://127.0.0.1:{port}", timeout=5)
