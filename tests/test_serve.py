"""`dap serve` with a real tiny DAP policy on a free loopback port, driven through `dapolicy.client`: chunks equal
in-process `predict_chunk` for the same seed, the server-side and client-side receding horizons, separate
state per client, a barrage of bad input the server survives, `--check`, and a clean SIGTERM/SIGINT exit."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from conftest import SquareEnv, render_square
from websockets.sync.client import connect as ws_connect

from dapolicy import cli, serve, wire
from dapolicy.client import ActionChunkBroker, PolicyClient, ServerDisconnected, ServerError, chunk_seed
from dapolicy.policies import load_pretrained, make_policy
from dapolicy.receding import RecedingHorizon, env_frame
from dapolicy.spec import EnvSpec

SPEC = EnvSpec(name="square", cameras=("top",), image_size=32, action_dim=2, proprio_dim=2, max_steps=24)
MAX_MB = 0.25  # the test server's message limit (a batch-1 tiny-model request is ~13 KB)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder holding model/ with a freshly initialised tiny DAP (weights need not be trained)."""
    torch.manual_seed(0)
    policy = make_policy("dap", SPEC, size="tiny")
    run = tmp_path_factory.mktemp("serve") / "run"
    policy.save_pretrained(run / "model")
    return run


@pytest.fixture(scope="module")
def policy(run_dir):
    return load_pretrained(run_dir).eval()


@pytest.fixture(scope="module")
def server(run_dir):
    """The server under test, loaded from the run folder like `dap serve RUN`, on a free loopback port."""
    srv = serve.PolicyServer(load_pretrained(run_dir), max_message_mb=MAX_MB, model_dir=run_dir / "model")
    with srv.running("127.0.0.1", 0):
        yield srv


@pytest.fixture
def client(server):
    with PolicyClient(server.url(), timeout=60) as c:
        yield c


def batch_obs(b: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0.05, 0.95, (b, 2))
    images = np.repeat(render_square(pos)[:, None, None], 2, axis=1)  # [B, T_o=2, C=1, 32, 32, 3]
    return {"images": images, "proprio": rng.normal(size=(b, 2, 2)).astype(np.float32)}


def env_obs(t: int) -> dict:
    pos = np.array([0.1 + 0.03 * t, 0.8 - 0.02 * t])
    return {"images": {"top": render_square(pos[None])[0]}, "proprio": np.array([t, -t], np.float32) / 10}


def reference_chunk(policy, obs, seed: int, **kwargs):
    return policy.predict_chunk(obs, generator=torch.Generator().manual_seed(seed), **kwargs)


# ----------------------------------------------------------------------------------------------- happy paths
def test_metadata_describes_the_model(client, policy):
    m = client.metadata
    assert m["method"] == "dap" and m["cameras"] == ["top"] and m["image_size"] == 32
    assert (m["action_dim"], m["proprio_dim"]) == (2, 2)
    assert (m["horizon"], m["n_action_steps"], m["n_obs_steps"]) == (policy.horizon, policy.n_action_steps,
                                                                      policy.n_obs_steps)
    assert m["modes"] == list(policy.capabilities.modes) and m["predicts_next_obs"] is True
    assert m["max_message_bytes"] == int(MAX_MB * 2**20) and m["model_dir"].endswith("model")


def test_infer_equals_in_process_predict_chunk_for_a_seed(client, policy):
    obs = batch_obs(3, seed=1)
    got = client.infer(obs, seed=123, return_next=True)
    want = reference_chunk(policy, obs, 123, return_next=True)
    assert got.actions.dtype == np.float32 and got.actions.shape == (3, policy.horizon, 2)
    np.testing.assert_array_equal(got.actions, want.actions)
    np.testing.assert_array_equal(got.next_frames, want.next_frames)
    assert got.server_ms > 0 and got.rtt_ms >= got.server_ms
    # a mode and a step count travel too; another seed gives another chunk
    got_off = client.infer(obs, seed=5, mode="off", steps=2)
    np.testing.assert_array_equal(got_off.actions, reference_chunk(policy, obs, 5, mode="off", steps=2).actions)
    assert not np.array_equal(client.infer(obs, seed=124).actions, got.actions)
    assert client.infer(obs, seed=123).next_frames is None


def test_act_is_a_server_side_receding_horizon(client, policy):
    """`act` re-plans every T_a ticks from the last T_o frames, exactly like select_action with a seeded noise."""
    t_a = policy.n_action_steps
    client.reset(seed=9)
    got, replanned = [], []
    for t in range(t_a + 3):
        got.append(client.act(env_obs(t)))
        replanned.append(client.last_reply["replanned"])
    assert replanned == [t % t_a == 0 for t in range(t_a + 3)]
    loop, gen, want = RecedingHorizon(policy.n_obs_steps, t_a), torch.Generator().manual_seed(9), []
    for t in range(t_a + 3):
        loop.observe(env_frame(env_obs(t), policy.spec))
        if loop.needs_chunk:
            loop.enqueue(policy.predict_chunk(loop.batch(), generator=gen).actions[0])
        want.append(loop.pop())
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    client.reset(seed=9)  # reset forgets history and queue and re-seeds: the episode replays
    np.testing.assert_array_equal(np.stack([client.act(env_obs(t)) for t in range(t_a + 3)]), np.stack(got))


def test_broker_against_the_server_equals_in_process_receding_horizon(client, policy):
    broker = ActionChunkBroker(client, ahead=0)
    broker.reset(seed=4)
    got = [broker.step(env_obs(t)) for t in range(2 * policy.n_action_steps + 1)]
    loop, want, k = RecedingHorizon(policy.n_obs_steps, policy.n_action_steps), [], 0
    for t in range(len(got)):
        loop.observe(env_frame(env_obs(t), policy.spec))
        if loop.needs_chunk:
            loop.enqueue(reference_chunk(policy, loop.batch(), chunk_seed(4, k)).actions[0])
            k += 1
        want.append(loop.pop())
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    assert broker.stats()["chunks"] == 3
    summary = client.latency.summary()
    assert summary["n"] >= 3 and summary["server_ms"]["p50"] > 0


def test_broker_ahead_of_time_never_waits_when_the_server_keeps_up(client, policy):
    """At 10 Hz with r = 8 ticks of slack a tiny-model chunk (~50 ms) arrives before the queue runs dry."""
    broker = ActionChunkBroker(client, ahead=policy.horizon - policy.n_action_steps)
    broker.reset(seed=0)
    for t in range(3 * policy.n_action_steps):
        start = time.perf_counter()
        assert broker.step(env_obs(t)).shape == (2,)
        time.sleep(max(0.0, start + 0.1 - time.perf_counter()))
    stats = broker.stats()
    broker.close()
    assert stats["background"] >= 2 and stats["waits"] == 1  # only the first chunk of the episode


def test_two_clients_keep_separate_state(server, policy):
    """Interleaved from two threads, each client's `act` sequence equals what it gets alone."""
    t_a, n = policy.n_action_steps, policy.n_action_steps + 4

    def episode(c: PolicyClient, seed: int, offset: int, out: list, barrier: threading.Barrier | None) -> None:
        c.reset(seed=seed)
        for t in range(n):
            if barrier is not None:
                barrier.wait(timeout=60)
            out.append(c.act(env_obs(t + offset)))

    with PolicyClient(server.url()) as a, PolicyClient(server.url()) as b:
        alone_a, alone_b = [], []
        episode(a, 1, 0, alone_a, None)
        episode(b, 2, 5, alone_b, None)
        both_a, both_b = [], []
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=episode, args=(a, 1, 0, both_a, barrier)),
                   threading.Thread(target=episode, args=(b, 2, 5, both_b, barrier))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    np.testing.assert_array_equal(np.stack(both_a), np.stack(alone_a))
    np.testing.assert_array_equal(np.stack(both_b), np.stack(alone_b))
    assert not np.array_equal(np.stack(alone_a), np.stack(alone_b))
    assert len(alone_a) == n and t_a < n


def test_a_slow_request_does_not_block_other_clients(server):
    """Inference runs off the event loop: a ping is answered while another client's long chunk computes."""
    obs = batch_obs(8, seed=0)
    with PolicyClient(server.url(), timeout=120) as slow, PolicyClient(server.url()) as fast:
        done = threading.Event()
        result: dict = {}

        def long_request() -> None:
            result["r"] = slow.infer(obs, seed=0, steps=40)
            done.set()

        th = threading.Thread(target=long_request)
        th.start()
        time.sleep(0.2)  # let the long chunk start
        pings = [fast.ping() for _ in range(5)]
        still_running = not done.is_set()
        th.join(timeout=120)
    assert still_running, "the long request finished before the pings; make it longer"
    assert max(pings) < result["r"].server_ms / 2


def test_serves_any_method(tmp_path):
    """The server only uses the policy contract: the FM baseline (no frames, no modes) serves the same way."""
    torch.manual_seed(0)
    make_policy("fm", SPEC, size="tiny").save_pretrained(tmp_path / "fm")
    fm = load_pretrained(tmp_path / "fm")
    obs = batch_obs(2, seed=8)
    with serve.PolicyServer(load_pretrained(tmp_path / "fm")).running() as srv, PolicyClient(srv.url()) as c:
        assert c.metadata["method"] == "fm" and c.metadata["modes"] == [] and not c.metadata["predicts_next_obs"]
        got = c.infer(obs, seed=2, return_next=True)
        assert got.next_frames is None
        np.testing.assert_array_equal(got.actions, reference_chunk(fm, obs, 2).actions)
        with pytest.raises(ServerError, match="modes: none"):
            c.infer(obs, mode="jacobi")


# ----------------------------------------------------------------------------------------------- bad input
def raw_request(ws, message_bytes: bytes | str) -> dict:
    ws.send(message_bytes)
    return wire.unpack(ws.recv(timeout=60))


def arr(dtype: str, shape: list, data: bytes) -> dict:
    return {"__ndarray__": 1, "dtype": dtype, "shape": shape, "data": data}


def bad_messages() -> list[tuple[str, bytes | str, str]]:
    """(what, message, text the error must contain)."""
    good = batch_obs(1, seed=0)
    rng = np.random.default_rng(0)

    def infer(obs, **extra) -> bytes:
        return wire.pack({"type": "infer", "obs": obs, **extra})

    frame = {"images": {"top": good["images"][0, 0, 0]}, "proprio": np.zeros(2, np.float32)}
    nan = good["proprio"].copy()
    nan[0, 1, 0] = np.nan
    return [
        ("random bytes", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "malformed"),
        ("text frame", "hello", "text"),
        ("not a map", msgpack.packb([1, 2, 3]), "map"),
        ("missing type", wire.pack({"obs": good}), "message type"),
        ("unknown type", wire.pack({"type": "launch"}), "'launch'"),
        ("wrong key", wire.pack({"type": "infer", "obz": good}), "'obz'"),
        ("bad id", wire.pack({"type": "ping", "id": "x"}), "'id'"),
        ("no obs", wire.pack({"type": "infer"}), "'obs'"),
        ("obs missing proprio", infer({"images": good["images"]}), "missing ['proprio']"),
        ("obs extra key", infer({**good, "depth": good["proprio"]}), "unexpected ['depth']"),
        ("images wrong shape", infer({**good, "images": good["images"][:, :, :, :16]}), "'images' has shape"),
        ("images wrong rank", infer({**good, "images": good["images"][0]}), "obs.images has shape"),
        ("images float", infer({**good, "images": good["images"].astype(np.float32)}), "dtype uint8"),
        ("proprio int", infer({**good, "proprio": good["proprio"].astype(np.int64)}), "float32"),
        ("proprio wrong dim", infer({**good, "proprio": np.zeros((1, 2, 5), np.float32)}), "'proprio' has shape"),
        ("proprio NaN", infer({**good, "proprio": nan}), "NaN"),
        ("images not an array", infer({**good, "images": [1, 2, 3]}), "must be an array"),
        ("batch mismatch", infer({**good, "proprio": np.zeros((2, 2, 2), np.float32)}), "batch"),
        ("empty batch", infer({"images": good["images"][:0], "proprio": good["proprio"][:0]}), "batch size"),
        ("forged array", infer({**good, "proprio": arr("float32", [1, 2, 2], b"\x00" * 3)}), "needs 16 bytes"),
        ("object dtype", infer({**good, "proprio": arr("object", [1], b"\x00" * 8)}), "not supported"),
        ("bad seed", infer(good, seed=-1), "'seed'"),
        ("bool seed", infer(good, seed=True), "'seed'"),
        ("bad mode", infer(good, mode="telepathy"), "telepathy"),
        ("bad steps", infer(good, steps=0), "'steps'"),
        ("bad return_next", infer(good, return_next="yes"), "return_next"),
        ("act missing camera", wire.pack({"type": "act", "obs": {**frame, "images": {}}}), "missing camera 'top'"),
        ("act unknown camera", wire.pack({"type": "act", "obs": {**frame, "images": {**frame["images"],
                                                                                    "side": frame["images"]["top"]}}}),
         "'side'"),
        ("act image size", wire.pack({"type": "act", "obs": {**frame, "images": {"top": np.zeros((8, 8, 3),
                                                                                                np.uint8)}}}),
         "expected uint8 (32, 32, 3)"),
        ("act NaN", wire.pack({"type": "act", "obs": {**frame, "proprio": np.array([np.nan, 0], np.float32)}}), "NaN"),
        ("act images not a map", wire.pack({"type": "act", "obs": {**frame, "images": np.zeros(3, np.uint8)}}), "map"),
    ]


def test_bad_input_gets_an_error_reply_and_the_connection_stays_usable(server, policy):
    obs = batch_obs(1, seed=3)
    want = reference_chunk(policy, obs, 11).actions
    errors_before = server.stats.errors
    with ws_connect(server.url(), compression=None, proxy=None, max_size=2**26) as ws:
        for what, message, needle in bad_messages():
            reply = raw_request(ws, message)
            assert reply["ok"] is False and reply["type"] == "error", what
            assert needle in reply["error"], f"{what}: {reply['error']!r} does not name {needle!r}"
            assert reply["server_ms"] == 0.0
        # the same connection still answers correctly
        ok = raw_request(ws, wire.pack({"type": "infer", "obs": obs, "seed": 11, "id": 7}))
        assert ok["ok"] and ok["id"] == 7
        np.testing.assert_array_equal(ok["actions"], want)
    assert server.stats.errors - errors_before == len(bad_messages())


def test_client_raises_server_error_naming_the_problem(client):
    with pytest.raises(ServerError, match=r"'proprio' has shape \(1, 1, 2\)") as info:
        client.infer({"images": batch_obs(1, 0)["images"], "proprio": np.zeros((1, 1, 2), np.float32)})
    assert info.value.request == "infer"
    assert client.ping() > 0  # still connected


def test_oversized_message_closes_that_connection_only(server, policy):
    obs = batch_obs(1, seed=2)
    with PolicyClient(server.url()) as bystander, PolicyClient(server.url()) as big:
        huge = {"images": np.zeros((48, 2, 1, 32, 32, 3), np.uint8), "proprio": np.zeros((48, 2, 2), np.float32)}
        with pytest.raises(ServerDisconnected, match="1009") as info:  # 295 KB > the 256 KB limit
            big.infer(huge)
        assert info.value.code == 1009 and "max-message-mb" in str(info.value)
        np.testing.assert_array_equal(bystander.infer(obs, seed=1).actions, reference_chunk(policy, obs, 1).actions)


def test_garbage_connections_and_vanishing_clients_do_not_hurt_the_server(server, policy):
    port = server.port
    # 1. random bytes instead of a WebSocket handshake, and a connection that sends nothing and closes
    for payload in (np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes(), b""):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            try:
                while sock.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    # 2. clients that vanish mid-request (a slow chunk in flight), abruptly and politely
    for abrupt in (True, False):
        with ws_connect(server.url(), compression=None, proxy=None) as ws:
            ws.send(wire.pack({"type": "infer", "obs": batch_obs(4, 0), "steps": 30}))
            if abrupt:
                ws.socket.shutdown(socket.SHUT_RDWR)
    # 3. the server still answers a new client correctly
    obs = batch_obs(2, seed=5)
    with PolicyClient(server.url(), timeout=120) as c:
        np.testing.assert_array_equal(c.infer(obs, seed=3).actions, reference_chunk(policy, obs, 3).actions)


# ----------------------------------------------------------------------------------------------- --check, CLI
def square_factory(*args, **kwargs) -> SquareEnv:
    return SquareEnv()


def test_check_runs_a_simulated_robot_through_the_client(run_dir):
    result = serve.check(run_dir, episodes=2, env_factory=square_factory, progress=None)
    assert result["env"] == "square" and result["n_episodes"] == 2
    assert 0.0 <= result["success_rate"] <= 1.0 and len(result["ci95"]) == 2
    assert all(r["steps"] >= 1 for r in result["episodes"])
    lat = result["latency"]
    assert lat["n"] >= 2 and lat["rtt_ms"]["p50"] >= lat["server_ms"]["p50"] > 0
    assert result["broker"]["chunks"] == lat["n"]
    text = serve.format_check(result)
    assert "round trip" in text and "success" in text
    # the same loop through the server-side receding horizon (`act`)
    result_act = serve.check(run_dir, episodes=1, env_factory=square_factory, progress=None, server_loop=True)
    assert result_act["latency"]["n"] >= 1 and result_act["broker"] is None


def test_cli_check(run_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(serve, "_default_env_factory", lambda: square_factory)
    out = tmp_path / "check.json"
    code = cli.main(["serve", str(run_dir / "model"), "--check", "--episodes", "1", "--ahead", "2",
                     "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "success" in text and "network + serialisation" in text and out.is_file()
    assert "broker:" in text


def test_cli_sampler_options_reach_the_served_policy(run_dir, monkeypatch, capsys):
    """`dap serve --sampler parallel=off` (e.g. where the second core is not free) sets the fast sampler's
    default for the served model; a bad setting is a usage error naming it."""
    from dapolicy.policies import fast_sampler

    monkeypatch.setattr(fast_sampler, "_DEFAULT", fast_sampler.SamplerOptions())
    monkeypatch.setattr(serve, "_default_env_factory", lambda: square_factory)
    code = cli.main(["serve", str(run_dir / "model"), "--check", "--episodes", "1", "--sampler", "parallel=off"])
    assert code == 0 and fast_sampler.get_options(None).parallel == "off"
    capsys.readouterr()
    assert cli.main(["serve", str(run_dir / "model"), "--sampler", "parallel=sometimes"]) != 0
    assert "parallel" in capsys.readouterr().err


def test_cli_matmul_precision_is_set_for_the_served_model(run_dir, monkeypatch, capsys):
    """`dap serve --matmul-precision high` (TF32 on a GPU) sets torch's precision before the model serves; a
    value torch does not know is a usage error."""
    import torch

    monkeypatch.setattr(serve, "_default_env_factory", lambda: square_factory)
    saved = torch.get_float32_matmul_precision()
    try:
        code = cli.main(["serve", str(run_dir / "model"), "--check", "--episodes", "1",
                         "--matmul-precision", "medium"])
        assert code == 0 and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved)
    capsys.readouterr()
    assert cli.main(["serve", str(run_dir / "model"), "--matmul-precision", "tf32"]) != 0
    assert "--matmul-precision" in capsys.readouterr().err


def test_check_refuses_an_env_that_cannot_feed_the_model(run_dir):
    class WideEnv(SquareEnv):
        spec = EnvSpec(name="wide", cameras=("top",), image_size=32, action_dim=3, proprio_dim=2, max_steps=5)

    with pytest.raises(ValueError, match="action_dim 3"):
        serve.check(run_dir, episodes=1, env_factory=lambda *a, **k: WideEnv(), progress=None)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_dap_serve_exits_cleanly_on_a_signal_with_a_request_in_flight(run_dir, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dapolicy", "serve", str(run_dir), "--port", "0",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"ws://127\.0\.0\.1:(\d+)", line)
        assert match, f"no address in {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        outcome: dict = {}
        with PolicyClient(f"ws://127.0.0.1:{match.group(1)}", timeout=60) as c:
            assert c.infer(batch_obs(1, 0), seed=0).actions.shape == (1, 16, 2)

            def in_flight() -> None:
                try:
                    outcome["reply"] = c.infer(batch_obs(4, 0), seed=0, steps=50)
                except (ServerError, ConnectionError) as exc:
                    outcome["failed"] = exc

            th = threading.Thread(target=in_flight)
            th.start()
            time.sleep(0.5)  # the request is on the server, its chunk computing
            proc.send_signal(sig)
            th.join(timeout=60)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "server stopped" in out
    assert "reply" in outcome, outcome  # the request in flight got its answer before the server closed
    assert outcome["reply"].actions.shape == (4, 16, 2)
    assert "Traceback" not in err
