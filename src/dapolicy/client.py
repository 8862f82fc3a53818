"""Robot-side client for `dap serve`: imports only numpy, websockets and msgpack (and `dapolicy.wire`).

The robot computer needs no torch: install numpy, websockets and msgpack, and this module with
`dapolicy/wire.py` (see docs/deployment.md). Two ways to drive a robot:

* `PolicyClient.act(obs)` each control tick: the server keeps this connection's observation history and
  action queue (receding horizon on the server);
* `ActionChunkBroker(client).step(obs)` each control tick: the history and queue live here, the server only
  answers stateless `infer` requests, and with `ahead=r` the next chunk is requested in the background while
  r actions are still queued, so the robot does not wait for the network or the model.

    with PolicyClient("ws://127.0.0.1:8765") as client:
        broker = ActionChunkBroker(client, ahead=2)
        broker.reset(seed=0)
        for _ in range(steps):
            obs = robot.observe()              # {"images": {camera: uint8 [S, S, 3]}, "proprio": [P]}
            robot.apply(broker.step(obs))
        print(format_latency(client.latency.summary()))
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import connect as _ws_connect

from dapolicy.receding import check_frame
from dapolicy.wire import DEFAULT_MAX_MESSAGE_MB, PROTOCOL_VERSION, WireError, pack, unpack

DEFAULT_URL = "ws://127.0.0.1:8765"

__all__ = ["ActionChunkBroker", "InferResult", "LatencyLog", "PolicyClient", "ServerDisconnected", "ServerError",
           "WireError", "format_latency", "frame_from_obs"]


class ServerError(RuntimeError):
    """The server answered a request with an error reply (the message says what it rejected)."""

    def __init__(self, message: str, error_type: str | None = None, request: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.request = request


class ServerDisconnected(ConnectionError):
    """The connection closed under a request (server stopped, message too big, network gone)."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


# ----------------------------------------------------------------------------------------------- latency
@dataclass(frozen=True)
class Timing:
    """One request as the client saw it: round trip, and the server's share of it (all in ms)."""

    kind: str
    rtt_ms: float
    server_ms: float  # the model's time (0 when it did not run)
    wait_ms: float  # queued behind other clients' inference
    handle_ms: float  # everything the server did for this request, decoding included

    @property
    def ran_model(self) -> bool:
        return self.server_ms > 0.0

    @property
    def other_ms(self) -> float:
        """Network, (de)serialisation and event-loop time: what is not the model and not queueing."""
        return max(0.0, self.rtt_ms - self.server_ms - self.wait_ms)


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "max": None, "mean": None}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "max": float(a.max()),
            "mean": float(a.mean())}


class LatencyLog:
    """Every request's timing, thread-safe (the broker's background requests add to it too)."""

    def __init__(self) -> None:
        self._records: list[Timing] = []
        self._lock = threading.Lock()

    def add(self, timing: Timing) -> None:
        with self._lock:
            self._records.append(timing)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    @property
    def records(self) -> list[Timing]:
        with self._lock:
            return list(self._records)

    def summary(self, kinds: Sequence[str] = ("infer", "act"), model_only: bool = True) -> dict[str, Any]:
        """p50/p90/max of round trip, model time, queueing and the rest, over requests that computed a chunk.

        model_only=False also counts `act` ticks answered from the server's queue (no model call).
        """
        rows = [r for r in self.records if r.kind in kinds and (r.ran_model or not model_only)]
        return {"n": len(rows), "rtt_ms": _percentiles([r.rtt_ms for r in rows]),
                "server_ms": _percentiles([r.server_ms for r in rows]),
                "wait_ms": _percentiles([r.wait_ms for r in rows]),
                "other_ms": _percentiles([r.other_ms for r in rows])}


def format_latency(summary: Mapping[str, Any]) -> str:
    """A Markdown table of a `LatencyLog.summary()`."""
    def cell(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    lines = [f"| per chunk, n={summary['n']} | p50 ms | p90 ms | max ms |", "|---|---|---|---|"]
    for key, label in (("rtt_ms", "round trip (client)"), ("server_ms", "model (server)"),
                       ("wait_ms", "waiting for the model worker"), ("other_ms", "network + serialisation")):
        s = summary[key]
        lines.append(f"| {label} | {cell(s['p50'])} | {cell(s['p90'])} | {cell(s['max'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- client
@dataclass
class InferResult:
    """One chunk: actions float32 [B, H, A] in env units; next_frames uint8 [B, C, S, S, 3] when asked for."""

    actions: np.ndarray
    next_frames: np.ndarray | None
    server_ms: float
    rtt_ms: float


class PolicyClient:
    """A synchronous connection to `dap serve` (one request at a time; safe to share between threads)."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 30.0,
                 max_message_mb: float = DEFAULT_MAX_MESSAGE_MB, connect: bool = True) -> None:
        self.url = url
        self.timeout = timeout
        self.max_message_bytes = int(max_message_mb * 2**20)
        self.latency = LatencyLog()
        self.last_reply: dict[str, Any] | None = None
        self._ws: Any = None
        self._stack: contextlib.ExitStack | None = None
        self._metadata: dict[str, Any] | None = None
        self._next_id = 0
        self._lock = threading.Lock()
        if connect:
            self.connect()

    # ------------------------------------------------------------------ connection
    def connect(self) -> "PolicyClient":
        """Open the connection and fetch the model's metadata (a second call is a no-op)."""
        if self._ws is not None:
            return self
        try:
            # proxy=None: a robot talks to its policy server directly, whatever HTTP(S)_PROXY says.
            # Entered as a context manager: the form websockets keeps across its connect() API change.
            stack = contextlib.ExitStack()
            self._ws = stack.enter_context(_ws_connect(self.url, open_timeout=self.timeout, compression=None,
                                                       max_size=self.max_message_bytes, proxy=None))
            self._stack = stack
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise ConnectionError(f"cannot connect to the policy server at {self.url}: {exc}") from exc
        meta = self.request({"type": "metadata"})["metadata"]
        if meta.get("protocol") != PROTOCOL_VERSION:
            self.close()
            raise ConnectionError(f"server speaks protocol {meta.get('protocol')}, this client {PROTOCOL_VERSION}")
        self._metadata = meta
        return self

    @property
    def metadata(self) -> dict[str, Any]:
        """The served model: cameras, image_size, action_dim, proprio_dim, horizon, n_action_steps, ..."""
        if self._metadata is None:
            self.connect()
        assert self._metadata is not None
        return self._metadata

    def close(self) -> None:
        self._ws = None
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> "PolicyClient":
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request, wait for its reply; raises `ServerError` for an error reply."""
        return self._call(message)[0]

    def _call(self, message: dict[str, Any]) -> tuple[dict[str, Any], Timing]:
        kind = str(message.get("type"))
        with self._lock:
            if self._ws is None:
                raise ConnectionError(f"not connected to {self.url} (call connect())")
            self._next_id += 1
            request_id = self._next_id
            start = time.perf_counter()
            data = pack({**message, "id": request_id})
            try:
                self._ws.send(data)
                raw = self._ws.recv(timeout=self.timeout)
            except TimeoutError as exc:
                self.close()  # a late reply would be taken for the next request's: start afresh
                raise TimeoutError(f"no reply to {kind!r} within {self.timeout} s; connection closed") from exc
            except ConnectionClosed as exc:
                self.close()
                raise _disconnected(exc, kind) from exc
            reply = unpack(raw)
            rtt_ms = (time.perf_counter() - start) * 1e3
            self.last_reply = reply
        if reply.get("id") not in (request_id, None):
            raise WireError(f"reply id {reply.get('id')!r} does not match request id {request_id}")
        if not reply.get("ok", False):
            raise ServerError(f"server rejected {kind!r}: {reply.get('error', reply)}", reply.get("error_type"),
                              reply.get("request"))
        timing = Timing(kind, rtt_ms, float(reply.get("server_ms", 0.0)), float(reply.get("wait_ms", 0.0)),
                        float(reply.get("handle_ms", 0.0)))
        self.latency.add(timing)
        return reply, timing

    def infer(self, obs: Mapping[str, np.ndarray], seed: int | None = None, mode: str | None = None,
              steps: int | None = None, return_next: bool = False) -> InferResult:
        """A chunk for a batch of histories {"images": uint8 [B, T_o, C, S, S, 3], "proprio": [B, T_o, P]}.

        Stateless: the server keeps nothing. seed: the sampling noise (same seed, same chunk).
        """
        message: dict[str, Any] = {"type": "infer", "obs": {"images": np.asarray(obs["images"]),
                                                            "proprio": np.asarray(obs["proprio"])}}
        for key, value in (("seed", seed), ("mode", mode), ("steps", steps)):
            if value is not None:
                message[key] = value
        if return_next:
            message["return_next"] = True
        reply, timing = self._call(message)
        return InferResult(reply["actions"], reply.get("next_frames"), timing.server_ms, timing.rtt_ms)

    def act(self, env_obs: Mapping[str, Any], return_next: bool = False) -> np.ndarray:
        """This tick's action with the server's receding horizon (a new chunk when its queue is empty).

        env_obs: {"images": {camera: uint8 [S, S, 3]}, "proprio": [P]}; extra cameras are not sent.
        """
        cameras = self.metadata["cameras"]
        images = env_obs["images"]
        frame = {"images": {c: np.asarray(images[c]) for c in cameras if c in images},
                 "proprio": np.asarray(env_obs["proprio"])}
        message: dict[str, Any] = {"type": "act", "obs": frame}
        if return_next:
            message["return_next"] = True
        return self.request(message)["action"]

    def step(self, env_obs: Mapping[str, Any]) -> np.ndarray:
        """Alias of `act`, for code written against a broker."""
        return self.act(env_obs)

    def reset(self, seed: int | None = None) -> None:
        """Start an episode: the server forgets this connection's history and queue; seed its noise."""
        self.request({"type": "reset"} if seed is None else {"type": "reset", "seed": int(seed)})

    def ping(self) -> float:
        """Round trip of an empty request in ms: the network and serialisation floor."""
        return self._call({"type": "ping"})[1].rtt_ms


def _disconnected(exc: ConnectionClosed, kind: str) -> ServerDisconnected:
    close = exc.rcvd or exc.sent
    code, reason = (close.code, close.reason) if close is not None else (None, "")
    explain = {1009: "message too big for the server's --max-message-mb", 1001: "server going away",
               1011: "server internal error"}.get(code or 0, "")
    text = f"connection closed during {kind!r}: code {code}" + (f" ({explain})" if explain else "")
    return ServerDisconnected(text + (f": {reason}" if reason else ""), code, reason)


# ----------------------------------------------------------------------------------------------- broker
def frame_from_obs(env_obs: Mapping[str, Any], cameras: Sequence[str], image_size: int,
                   proprio_dim: int) -> dict[str, np.ndarray]:
    """One env observation -> {"images": uint8 [C, S, S, 3] in model camera order, "proprio": float32 [P]}.

    The server's own checks (`dapolicy.receding.check_frame`), run here so a wrong camera or size fails on the
    robot before any network round trip.
    """
    return check_frame(env_obs, cameras, image_size, proprio_dim)


def chunk_seed(seed: int, index: int) -> int:
    """Seed of chunk `index` of an episode seeded `seed` (mixed, so nearby episodes share no noise)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class ActionChunkBroker:
    """Client-side receding horizon: one action per control tick, chunks fetched on time or ahead of time.

    Each `step(obs)` is one tick. With ahead=0 it behaves exactly like `Policy.select_action`: when the queue
    is empty it requests a chunk for the last T_o observations and queues its first T_a actions. With
    ahead=r > 0, a chunk of T_a + r actions is queued and, when r are left, the next one is requested in the
    background; when it arrives d ticks later its first d actions (already in the past) are dropped, so the
    robot never waits unless a request takes longer than r ticks. Re-planning stays every T_a ticks.
    """

    def __init__(self, client: PolicyClient, ahead: int = 0, seed: int | None = None, mode: str | None = None,
                 steps: int | None = None) -> None:
        meta = client.metadata
        self.client = client
        self.n_obs_steps, self.horizon = int(meta["n_obs_steps"]), int(meta["horizon"])
        self.n_action_steps = int(meta["n_action_steps"])
        self.cameras, self.image_size = tuple(meta["cameras"]), int(meta["image_size"])
        self.proprio_dim = int(meta["proprio_dim"])
        if not 0 <= ahead <= self.horizon - self.n_action_steps:
            raise ValueError(f"ahead must be in [0, H - T_a] = [0, {self.horizon - self.n_action_steps}] for this "
                             f"model (H={self.horizon}, T_a={self.n_action_steps}), got {ahead}")
        self.ahead = int(ahead)
        self.mode, self.steps = mode, steps
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dap-broker") if ahead else None
        self._pending: Future[np.ndarray] | None = None
        self._pending_tick = 0
        self._counts = {"ticks": 0, "chunks": 0, "background": 0, "waits": 0, "dropped_actions": 0}
        self._wait_ms: list[float] = []
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        """Start an episode: forget history and queue; seed each chunk's noise from `seed` (None = unseeded)."""
        self._discard_pending()
        self._history: deque[dict[str, np.ndarray]] = deque(maxlen=self.n_obs_steps)
        self._queue: deque[np.ndarray] = deque()
        self._tick = 0
        self._chunk_index = 0
        self.seed = seed

    def _batch(self) -> dict[str, np.ndarray]:
        return {k: np.stack([f[k] for f in self._history])[None] for k in ("images", "proprio")}

    def _request(self, batch: dict[str, np.ndarray], seed: int | None) -> np.ndarray:
        return self.client.infer(batch, seed=seed, mode=self.mode, steps=self.steps).actions[0]

    def _next_seed(self) -> int | None:
        seed = None if self.seed is None else chunk_seed(self.seed, self._chunk_index)
        self._chunk_index += 1
        return seed

    def _install(self, chunk: np.ndarray, requested_at: int) -> None:
        """Queue chunk[d : T_a + ahead], d = ticks since the observation the chunk was conditioned on."""
        d = self._tick - requested_at
        self._counts["dropped_actions"] += d
        self._queue = deque(np.asarray(a, np.float32) for a in chunk[d: self.n_action_steps + self.ahead])
        self._counts["chunks"] += 1

    def step(self, env_obs: Mapping[str, Any]) -> np.ndarray:
        """This tick's action (float32 [A])."""
        frame = frame_from_obs(env_obs, self.cameras, self.image_size, self.proprio_dim)
        if not self._history:
            self._history.extend([frame] * self.n_obs_steps)  # pad like the training sampler
        else:
            self._history.append(frame)
        pending = self._pending
        if pending is not None and (pending.done() or not self._queue):
            if not pending.done():  # the queue ran dry: the robot has to wait for the chunk in flight
                start = time.perf_counter()
                chunk = pending.result()
                self._waited(start)
            else:
                chunk = pending.result()
            self._pending = None
            self._install(chunk, self._pending_tick)
        if not self._queue:
            start = time.perf_counter()
            chunk = self._request(self._batch(), self._next_seed())
            self._waited(start)
            self._install(chunk, self._tick)
        if self._executor is not None and self._pending is None and len(self._queue) <= self.ahead:
            self._pending = self._executor.submit(self._request, self._batch(), self._next_seed())
            self._pending_tick = self._tick
            self._counts["background"] += 1
        self._tick += 1
        self._counts["ticks"] += 1
        return self._queue.popleft()

    def _waited(self, start: float) -> None:
        self._counts["waits"] += 1
        self._wait_ms.append((time.perf_counter() - start) * 1e3)

    def stats(self) -> dict[str, Any]:
        """Ticks, chunks (and how many came ahead of time), ticks on which the robot waited, and how long."""
        waits = self._wait_ms
        return {**self._counts, "ahead": self.ahead, "max_wait_ms": max(waits) if waits else 0.0,
                "p50_wait_ms": float(np.percentile(waits, 50)) if waits else 0.0}

    def _discard_pending(self) -> None:
        if self._pending is not None:
            try:
                self._pending.result()  # let it finish so the connection is free; its chunk is stale
            except Exception:  # the episode is over; its failure no longer matters
                pass
            self._pending = None

    def close(self) -> None:
        """Wait for a request in flight and stop the background thread (the client stays open)."""
        self._discard_pending()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


# ----------------------------------------------------------------------------------------------- timing tool
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dapolicy.client [URL]`: time batch-1 chunk requests against a running `dap serve`.

    Run it on the robot computer to measure the real network; the observation is random noise of the
    served model's shapes (latency does not depend on what the images show).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dapolicy.client", description=main.__doc__)
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"server address (default {DEFAULT_URL})")
    parser.add_argument("--requests", type=int, default=50, help="timed chunk requests (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random observation")
    args = parser.parse_args(argv)
    with PolicyClient(args.url) as client:
        m = client.metadata
        t, c, s = m["n_obs_steps"], len(m["cameras"]), m["image_size"]
        rng = np.random.default_rng(args.seed)
        obs = {"images": rng.integers(0, 256, (1, t, c, s, s, 3), dtype=np.uint8),
               "proprio": rng.uniform(-1, 1, (1, t, m["proprio_dim"])).astype(np.float32)}
        client.infer(obs, seed=0)  # untimed: the first request may pay for connection set-up
        client.latency.clear()
        pings = [client.ping() for _ in range(20)]
        for i in range(args.requests):
            client.infer(obs, seed=i)
        size = len(pack({"type": "infer", "obs": obs, "seed": 0, "id": 1}))
        print(f"{m['method']} model ({m['env']}, {c} camera(s) of {s} px, T_o={t}, H={m['horizon']}) on "
              f"{m['device']} at {args.url}; request {size / 1024:.1f} KiB, batch 1")
        print(format_latency(client.latency.summary()))
        print(f"ping (no model, no payload): p50 {np.percentile(pings, 50):.2f} ms, max {max(pings):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
