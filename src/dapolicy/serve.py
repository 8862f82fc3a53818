"""`dap serve`: a policy server for real-time deployment, and `--check`, a simulated robot loop against it.

The robot-side process runs `dapolicy.client` (numpy + websockets + msgpack, no torch) and talks to this
server over a WebSocket; every message is a msgpack map (`dapolicy.wire`, arrays as dtype + shape + bytes).
Requests (each may carry an integer "id", echoed in the reply):

* ``metadata``: cameras, image size, action/proprio dimension, horizon, T_a, T_o, method, modes, ...
* ``infer`` (stateless): ``obs`` = {"images": uint8 [B, T_o, C, S, S, 3], "proprio": float [B, T_o, P]},
  optional ``seed``, ``mode``, ``steps``, ``return_next`` -> ``actions`` float32 [B, H, A] (+ ``next_frames``).
* ``act`` (server-side receding horizon, one history and action queue per connection): ``obs`` = one env
  observation {"images": {camera: uint8 [S, S, 3]}, "proprio": float [P]} -> ``action`` float32 [A].
* ``reset``: forget this connection's history and queue; optional ``seed`` seeds its sampling noise.
* ``ping``: a no-op, to measure the network alone.

Every reply has ``ok``, ``server_ms`` (model time, 0 when the model did not run) and ``wait_ms`` (time queued
behind other clients' inference); a failed request gets {"type": "error", "ok": False, "error": "..."} and the
connection stays usable. Inference runs on one worker thread under one model lock, so the event loop keeps
serving every client's I/O while a chunk is computed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dapolicy import __version__
from dapolicy.wire import DEFAULT_MAX_MESSAGE_MB, PROTOCOL_VERSION, WireError, pack, unpack

log = logging.getLogger("dapolicy.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_BATCH = 64
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# Messages above this size are decoded on a helper thread, so a large upload cannot stall other clients.
_INLINE_DECODE_BYTES = 1 << 20
# Keys each request type accepts; anything else is an error naming the key (a typo must not pass silently).
REQUEST_KEYS: dict[str, frozenset[str]] = {
    "metadata": frozenset({"type", "id"}),
    "ping": frozenset({"type", "id"}),
    "reset": frozenset({"type", "id", "seed"}),
    "infer": frozenset({"type", "id", "obs", "seed", "mode", "steps", "return_next"}),
    "act": frozenset({"type", "id", "obs", "mode", "steps", "return_next"}),
}
FLOAT_DTYPES = ("float16", "float32", "float64")


class BadRequest(ValueError):
    """A request the server understood well enough to reject (the text tells the client what to fix)."""


class ServerClosing(RuntimeError):
    """A queued request dropped because the server is shutting down."""


# ----------------------------------------------------------------------------------------------- requests
def _check_keys(message: dict[str, Any], kind: str) -> None:
    extra = sorted(map(str, set(message) - REQUEST_KEYS[kind]))
    if extra:
        raise BadRequest(f"{kind!r} request has unexpected key(s) {extra} (allowed: {sorted(REQUEST_KEYS[kind])})")


def _int_field(message: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"{key!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _array(value: Any, name: str, dtypes: tuple[str, ...], ndim: int, shape_hint: str) -> np.ndarray:
    """A decoded array, checked for type, dtype and rank (shapes are checked against the model later)."""
    if not isinstance(value, np.ndarray):
        raise BadRequest(f"{name} must be an array {shape_hint}, got {type(value).__name__}")
    if value.dtype.name not in dtypes:
        raise BadRequest(f"{name} must have dtype {' or '.join(dtypes)}, got {value.dtype.name}")
    if value.ndim != ndim:
        raise BadRequest(f"{name} has shape {list(value.shape)}, expected {shape_hint}")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise BadRequest(f"{name} contains NaN or inf values")
    return value


@dataclass
class Session:
    """One connection's state: its receding-horizon loop and its sampling-noise generator."""

    remote: str
    loop: Any  # RecedingHorizon
    generator: Any = None  # torch.Generator seeded by `reset(seed)`, else None (torch's global RNG)
    requests: int = 0


@dataclass
class ServerStats:
    """Counters for the log line at shutdown and for tests."""

    connections: int = 0
    requests: int = 0
    errors: int = 0
    inferences: int = 0
    by_error: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- server
class PolicyServer:
    """Serves one loaded policy (any method) to any number of WebSocket clients.

    All model calls go through one worker thread and one lock: a torch model is not re-entrant on the
    same weights, and a single worker makes queueing (`wait_ms`) visible instead of oversubscribing the CPU.
    """

    def __init__(self, policy: Any, max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
                 max_batch: int = DEFAULT_MAX_BATCH, model_dir: str | Path | None = None,
                 warm_up: bool = True) -> None:
        if not max_message_mb > 0:
            raise ValueError(f"max_message_mb must be > 0, got {max_message_mb}")
        self.policy = policy.eval()
        self.max_message_bytes = int(max_message_mb * 2**20)
        self.max_batch = int(max_batch)
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.stats = ServerStats()
        self._model_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dap-infer")
        self._closing = False
        self._in_flight = 0
        self.port: int | None = None
        self.metadata = self._metadata()
        if warm_up:  # the first calls pay for lazy initialisation (traces from the 2nd call on a CPU, the CUDA
            for _ in range(2):  # graph on a GPU, see fast_sampler.SamplerOptions); no client should see that
                self._predict(self._blank_batch(), None, None, None, False)

    # ------------------------------------------------------------------ model side (worker thread)
    def _metadata(self) -> dict[str, Any]:
        p, spec = self.policy, self.policy.spec
        return {
            "protocol": PROTOCOL_VERSION, "dapolicy_version": __version__, "method": p.method,
            "env": spec.name, "cameras": list(spec.cameras), "image_size": int(spec.image_size),
            "action_dim": int(spec.action_dim), "proprio_dim": int(spec.proprio_dim),
            "horizon": p.horizon, "n_action_steps": p.n_action_steps, "n_obs_steps": p.n_obs_steps,
            "next_obs_offset": p.next_obs_offset, "max_steps": int(spec.max_steps),
            "action_low": [float(x) for x in spec.action_low], "action_high": [float(x) for x in spec.action_high],
            "modes": list(p.capabilities.modes), "predicts_next_obs": bool(p.capabilities.predicts_next_obs),
            "device": str(p.device), "max_message_bytes": self.max_message_bytes, "max_batch": self.max_batch,
            "model_dir": self.model_dir,
        }

    def _blank_batch(self) -> dict[str, np.ndarray]:
        m = self.metadata
        t, c, s = m["n_obs_steps"], len(m["cameras"]), m["image_size"]
        return {"images": np.zeros((1, t, c, s, s, 3), np.uint8),
                "proprio": np.zeros((1, t, m["proprio_dim"]), np.float32)}

    def _generator(self, seed: int | None) -> Any:
        if seed is None:
            return None
        import torch

        return torch.Generator(device=self.policy.device).manual_seed(seed)

    def _predict(self, obs: dict[str, np.ndarray], generator: Any, mode: str | None, steps: int | None,
                 return_next: bool) -> tuple[Any, float]:
        """predict_chunk under the model lock -> (ChunkPrediction, milliseconds), GPU work included."""
        import torch

        with self._model_lock:
            start = time.perf_counter()
            with torch.no_grad():
                pred = self.policy.predict_chunk(obs, return_next=return_next, mode=mode, steps=steps,
                                                 generator=generator)
            if self.policy.device.type == "cuda":
                torch.cuda.synchronize(self.policy.device)
            return pred, (time.perf_counter() - start) * 1e3

    def _run_in_worker(self, fn: Callable[[], dict[str, Any]], submitted: float) -> dict[str, Any]:
        """Runs on the worker thread: adds how long the request waited for the model."""
        wait_ms = (time.perf_counter() - submitted) * 1e3
        reply = fn()
        reply["wait_ms"] = wait_ms
        return reply

    def _options(self, message: dict[str, Any]) -> tuple[str | None, int | None, bool]:
        mode = message.get("mode")
        modes = self.metadata["modes"]
        if mode is not None and (not isinstance(mode, str) or mode not in modes):
            raise BadRequest(f"unknown mode {mode!r} for method {self.metadata['method']!r} "
                             f"(modes: {', '.join(modes) or 'none'})")
        steps = _int_field(message, "steps", 1, 10_000)
        return_next = message.get("return_next", False)
        if not isinstance(return_next, bool):
            raise BadRequest(f"'return_next' must be true or false, got {return_next!r}")
        return mode, steps, return_next

    def _validate_batch(self, obs: Any) -> dict[str, np.ndarray]:
        m = self.metadata
        t, c, s, p = m["n_obs_steps"], len(m["cameras"]), m["image_size"], m["proprio_dim"]
        if not isinstance(obs, dict):
            raise BadRequest(f"'obs' must be a map with keys 'images' and 'proprio', got {type(obs).__name__}")
        missing, extra = {"images", "proprio"} - set(obs), set(obs) - {"images", "proprio"}
        if missing or extra:
            raise BadRequest("'obs' must have exactly the keys ['images', 'proprio']"
                             + (f"; missing {sorted(missing)}" if missing else "")
                             + (f"; unexpected {sorted(map(str, extra))}" if extra else ""))
        images = _array(obs["images"], "obs.images", ("uint8",), 6, f"[B, {t}, {c}, {s}, {s}, 3]")
        proprio = _array(obs["proprio"], "obs.proprio", FLOAT_DTYPES, 3, f"[B, {t}, {p}]")
        if images.shape[0] != proprio.shape[0]:
            raise BadRequest(f"obs.images has batch {images.shape[0]} but obs.proprio has batch {proprio.shape[0]}")
        if not 1 <= images.shape[0] <= self.max_batch:
            raise BadRequest(f"batch size must be in [1, {self.max_batch}], got {images.shape[0]}")
        return {"images": images, "proprio": proprio}

    def _validate_frame(self, obs: Any) -> dict[str, Any]:
        m = self.metadata
        s, p = m["image_size"], m["proprio_dim"]
        if not isinstance(obs, dict) or set(obs) != {"images", "proprio"}:
            got = sorted(map(str, obs)) if isinstance(obs, dict) else type(obs).__name__
            raise BadRequest(f"'obs' of an 'act' request must be {{'images': {{camera: uint8 [{s}, {s}, 3]}}, "
                             f"'proprio': float [{p}]}}, got {got}")
        images = obs["images"]
        if not isinstance(images, dict):
            raise BadRequest(f"obs.images must be a map camera -> image (cameras {m['cameras']}), "
                             f"got {type(images).__name__}")
        extra = sorted(map(str, set(images) - set(m["cameras"])))
        if extra:
            raise BadRequest(f"obs.images has unknown camera(s) {extra} (the model's cameras: {m['cameras']})")
        for cam in m["cameras"]:
            if cam not in images:
                raise BadRequest(f"obs.images is missing camera {cam!r} (the model's cameras: {m['cameras']})")
            _array(images[cam], f"obs.images[{cam!r}]", ("uint8",), 3, f"[{s}, {s}, 3]")
        _array(obs["proprio"], "obs.proprio", FLOAT_DTYPES, 1, f"[{p}]")
        return obs

    def _infer(self, message: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        """Validate on the loop (cheap) and return the model work for the worker thread."""
        obs = self._validate_batch(message.get("obs"))
        seed = _int_field(message, "seed", 0, 2**63 - 1)
        mode, steps, return_next = self._options(message)

        def work() -> dict[str, Any]:
            pred, ms = self._predict(obs, self._generator(seed), mode, steps, return_next)
            reply: dict[str, Any] = {"actions": np.asarray(pred.actions, np.float32), "server_ms": ms}
            if return_next and pred.next_frames is not None:
                reply["next_frames"] = np.asarray(pred.next_frames, np.uint8)
            return reply

        return work

    def _act(self, session: Session, message: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        from dapolicy.receding import env_frame

        obs = self._validate_frame(message.get("obs"))
        mode, steps, return_next = self._options(message)
        try:
            frame = env_frame(obs, self.policy.spec)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc

        def work() -> dict[str, Any]:
            loop = session.loop
            loop.observe(frame)
            reply: dict[str, Any] = {"replanned": False, "server_ms": 0.0}
            if loop.needs_chunk:
                try:
                    pred, ms = self._predict(loop.batch(), session.generator, mode, steps, return_next)
                except BaseException:
                    session.loop.reset()  # a half-filled history must not outlive a failed chunk
                    raise
                loop.enqueue(pred.actions[0])
                reply.update(replanned=True, server_ms=ms, chunk=np.asarray(pred.actions[0], np.float32))
                if return_next and pred.next_frames is not None:
                    reply["next_frames"] = np.asarray(pred.next_frames[0], np.uint8)
            reply["action"] = np.asarray(loop.pop(), np.float32)
            return reply

        return work

    # ------------------------------------------------------------------ I/O side (event loop)
    def _new_session(self, remote: str) -> Session:
        from dapolicy.receding import RecedingHorizon

        return Session(remote, RecedingHorizon(self.policy.n_obs_steps, self.policy.n_action_steps))

    async def _dispatch(self, session: Session, message: dict[str, Any]) -> dict[str, Any]:
        kind = message.get("type")
        if not isinstance(kind, str) or kind not in REQUEST_KEYS:
            raise BadRequest(f"unknown or missing message type {kind!r} (expected one of {', '.join(REQUEST_KEYS)})")
        _check_keys(message, kind)
        if kind == "metadata":
            return {"metadata": self.metadata, "server_ms": 0.0, "wait_ms": 0.0}
        if kind == "ping":
            return {"server_ms": 0.0, "wait_ms": 0.0}
        if kind == "reset":
            seed = _int_field(message, "seed", 0, 2**63 - 1)
            # Session state is only ever touched on the worker thread, like the model.
            work = self._reset_work(session, seed)
        elif kind == "infer":
            work = self._infer(message)
        else:
            work = self._act(session, message)
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self._executor, self._run_in_worker, work, time.perf_counter())
        self.stats.inferences += int(reply.get("server_ms", 0.0) > 0)
        return reply

    def _reset_work(self, session: Session, seed: int | None) -> Callable[[], dict[str, Any]]:
        def work() -> dict[str, Any]:
            session.loop.reset()
            session.generator = self._generator(seed)
            return {"server_ms": 0.0}

        return work

    async def _decode(self, data: Any) -> dict[str, Any]:
        if isinstance(data, (bytes, bytearray)) and len(data) > _INLINE_DECODE_BYTES:
            return await asyncio.get_running_loop().run_in_executor(None, unpack, data)
        return unpack(data)

    async def handler(self, websocket: Any) -> None:
        """One connection: requests are answered in order; a bad one gets an error reply, never a crash."""
        from websockets.exceptions import ConnectionClosed

        remote = _remote_name(websocket)
        session = self._new_session(remote)
        self.stats.connections += 1
        log.info("client %s connected", remote)
        try:
            async for data in websocket:
                reply = await self._answer(session, data)
                await websocket.send(pack(reply))
        except ConnectionClosed as exc:  # vanished mid-request, oversized message, or server shutdown
            log.info("client %s disconnected: %s", remote, exc)
        else:
            log.info("client %s disconnected", remote)

    async def _answer(self, session: Session, data: Any) -> dict[str, Any]:
        """The reply to one raw message (an error reply for anything wrong with it)."""
        self.stats.requests += 1
        session.requests += 1
        start = time.perf_counter()
        request_id: Any = None
        kind: Any = None
        try:
            if self._closing:
                raise ServerClosing("server is shutting down; request not run")
            message = await self._decode(data)
            request_id, kind = message.get("id"), message.get("type")
            if request_id is not None and (not isinstance(request_id, int) or isinstance(request_id, bool)):
                request_id = None
                raise BadRequest("'id' must be an integer")
            self._in_flight += 1
            try:
                reply = await self._dispatch(session, message)
            finally:
                self._in_flight -= 1
            reply.update(type=kind, ok=True)
        except (WireError, BadRequest, ValueError, ServerClosing) as exc:  # UnsupportedByMethod is a ValueError
            reply = self._error(exc, kind)
        except Exception as exc:  # a bug or a model failure: report it, keep serving the others
            log.error("request %r from %s failed:\n%s", kind, session.remote, traceback.format_exc())
            reply = self._error(exc, kind, internal=True)
        reply["id"] = request_id
        reply.setdefault("server_ms", 0.0)
        reply.setdefault("wait_ms", 0.0)
        reply["handle_ms"] = (time.perf_counter() - start) * 1e3
        return reply

    def _error(self, exc: BaseException, kind: Any, internal: bool = False) -> dict[str, Any]:
        name = type(exc).__name__
        self.stats.errors += 1
        self.stats.by_error[name] = self.stats.by_error.get(name, 0) + 1
        text = f"internal error ({name}): {exc}" if internal else str(exc)
        return {"type": "error", "ok": False, "error": text, "error_type": name,
                "request": kind if isinstance(kind, str) else None}

    async def serve(self, host: str = DEFAULT_HOST, port: int = 0, stop: asyncio.Event | None = None,
                    ready: Callable[[int], None] | None = None, grace_s: float = 30.0) -> None:
        """Listen until `stop` is set; then refuse new requests, let the ones in flight reply (at most
        `grace_s` seconds), and close every connection (code 1001, going away)."""
        from websockets.asyncio.server import serve

        stop = stop or asyncio.Event()
        # compression off: images barely compress and deflate would cost more than it saves on a LAN.
        async with serve(self.handler, host, port, max_size=self.max_message_bytes, compression=None,
                         logger=logging.getLogger("dapolicy.serve.ws")) as server:
            self.port = int(next(iter(server.sockets)).getsockname()[1])
            if ready is not None:
                ready(self.port)
            await stop.wait()
            self._closing = True
            deadline = time.perf_counter() + grace_s
            while self._in_flight and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
            server.close()
            await server.wait_closed()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    @contextlib.contextmanager
    def running(self, host: str = DEFAULT_HOST, port: int = 0, timeout: float = 30.0) -> Iterator["PolicyServer"]:
        """Serve on a background thread for the `with` block (tests, `--check`); `self.port` is the bound port."""
        started = threading.Event()
        holder: dict[str, Any] = {}

        async def main() -> None:
            holder["loop"], holder["stop"] = asyncio.get_running_loop(), asyncio.Event()
            await self.serve(host, port, holder["stop"], lambda _: started.set())

        def target() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # surfaced to the caller below
                holder["error"] = exc
                started.set()

        thread = threading.Thread(target=target, name="dap-serve", daemon=True)
        thread.start()
        if not started.wait(timeout) or "error" in holder:
            raise RuntimeError(f"policy server did not start on {host}:{port}: {holder.get('error', 'timeout')}")
        try:
            yield self
        finally:
            holder["loop"].call_soon_threadsafe(holder["stop"].set)
            thread.join(timeout)

    def url(self, host: str = DEFAULT_HOST) -> str:
        return f"ws://{_url_host(host)}:{self.port}"


def _remote_name(websocket: Any) -> str:
    try:
        address = websocket.remote_address
        return f"{address[0]}:{address[1]}"
    except Exception:  # a socket already gone has no address
        return "?"


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def serve_forever(server: PolicyServer, host: str, port: int) -> int:
    """Run in the foreground until SIGINT/SIGTERM; returns 0 after a clean shutdown."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows / off the main thread
                loop.add_signal_handler(sig, stop.set)

        def ready(bound: int) -> None:
            m = server.metadata
            print(f"serving {m['method']} model ({m['env']}, cameras {m['cameras']}, {m['image_size']} px, "
                  f"H={m['horizon']} T_a={m['n_action_steps']} T_o={m['n_obs_steps']}) on ws://{_url_host(host)}:"
                  f"{bound} [{m['device']}]; Ctrl-C stops", flush=True)

        await server.serve(host, port, stop, ready)

    asyncio.run(main())
    s = server.stats
    print(f"server stopped: {s.connections} connection(s), {s.requests} request(s), {s.inferences} chunk(s), "
          f"{s.errors} error reply(ies)", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- --check
def _default_env_factory() -> Callable[..., Any]:
    from dapolicy.envs import make_env

    return make_env


def check(path: str | Path, env: str | None = None, episodes: int = 3, seed: int = 100_000,
          max_steps: int | None = None, ahead: int = 0, hz: float | None = None, server_loop: bool = False,
          device: str | None = "cpu", max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
          env_factory: Callable[..., Any] | None = None, policy: Any = None,
          progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Serve `path` on a free loopback port and drive a simulated robot through the client against it.

    Episode i uses env seed `seed + i`; each chunk's sampling noise is seeded from it too. ahead: the
    broker asks for the next chunk when this many actions are left (0 = only when the queue is empty).
    hz: pace the loop at this control rate (a real robot's clock; None = as fast as possible).
    server_loop: use the server-side receding horizon (`act`) instead of the client-side broker.
    """
    from dapolicy.client import ActionChunkBroker, PolicyClient
    from dapolicy.evaluate import load_policy
    from dapolicy.policies.registry import resolve_model_dir
    from dapolicy.stats import wilson_interval

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if hz is not None and not hz > 0:
        raise ValueError(f"hz must be > 0, got {hz}")
    model_dir = resolve_model_dir(path) if policy is None else None
    policy = policy if policy is not None else load_policy(path, device)
    server = PolicyServer(policy, max_message_mb=max_message_mb, model_dir=model_dir)
    factory = env_factory or _default_env_factory()
    records: list[dict[str, Any]] = []
    with server.running(DEFAULT_HOST, 0), PolicyClient(server.url(), max_message_mb=max_message_mb) as client:
        meta = client.metadata
        env_name = env or meta["env"]
        environment = factory(env_name, image_size=meta["image_size"], cameras=tuple(meta["cameras"]))
        broker = None if server_loop else ActionChunkBroker(client, ahead=ahead)
        try:
            _check_env_fits(environment.spec, meta)
            limit = max_steps if max_steps is not None else int(environment.spec.max_steps)
            start = time.perf_counter()
            for i in range(episodes):
                ep_seed = seed + i
                if broker is not None:
                    broker.reset(seed=ep_seed)
                else:
                    client.reset(seed=ep_seed)
                obs, success, score, n = environment.reset(ep_seed), False, 0.0, 0
                for _ in range(limit):
                    tick = time.perf_counter()
                    action = broker.step(obs) if broker is not None else client.act(obs)
                    obs, result = environment.step(action)
                    n += 1
                    score, success = max(score, float(result.score)), success or bool(result.success)
                    if success or result.done:
                        break
                    if hz is not None:
                        time.sleep(max(0.0, tick + 1.0 / hz - time.perf_counter()))
                records.append({"episode": i, "seed": ep_seed, "success": success, "steps": n, "score": score})
                if progress is not None:
                    progress(f"episode {i + 1}/{episodes} (seed {ep_seed}): {'success' if success else 'failure'} "
                             f"after {n} steps")
            wall = time.perf_counter() - start
        finally:
            environment.close()
            if broker is not None:
                broker.close()
        latency = client.latency.summary()
        loop_stats = broker.stats() if broker is not None else None
    n_success = sum(r["success"] for r in records)
    return {"env": env_name, "method": meta["method"], "n_episodes": len(records), "n_success": n_success,
            "success_rate": n_success / len(records), "ci95": list(wilson_interval(n_success, len(records))),
            "episodes": records, "latency": latency, "broker": loop_stats, "wall_time_s": wall,
            "settings": {"seed": seed, "max_steps": limit, "ahead": ahead, "hz": hz, "server_loop": server_loop,
                         "device": meta["device"], "metadata": meta}}


def _check_env_fits(env_spec: Any, meta: dict[str, Any]) -> None:
    """Fail before the first step when the env cannot feed the served model."""
    if int(env_spec.action_dim) != meta["action_dim"]:
        raise ValueError(f"env {env_spec.name!r} has action_dim {env_spec.action_dim}, the model expects "
                         f"{meta['action_dim']}")
    missing = sorted(set(meta["cameras"]) - set(env_spec.cameras))
    if missing:
        raise ValueError(f"env {env_spec.name!r} lacks the model's cameras {missing}")
    if int(env_spec.image_size) != meta["image_size"]:
        raise ValueError(f"env renders {env_spec.image_size} px, the model expects {meta['image_size']} px")


def format_check(result: dict[str, Any]) -> str:
    """A few human lines: success with its interval, then the latency table."""
    from dapolicy.client import format_latency

    lines = [f"{result['method']} on {result['env']}: success {result['n_success']}/{result['n_episodes']} "
             f"({result['success_rate']:.0%}, 95% CI [{result['ci95'][0]:.0%}, {result['ci95'][1]:.0%}]) "
             f"in {result['wall_time_s']:.1f} s, device {result['settings']['device']}"]
    lines.append(format_latency(result["latency"]))
    if result["broker"]:
        b = result["broker"]
        lines.append(f"broker: {b['ticks']} ticks, {b['chunks']} chunks ({b['background']} ahead of time), "
                     f"robot waited on {b['waits']} tick(s), longest wait {b['max_wait_ms']:.1f} ms")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    from dapolicy import cli_options as opt

    parser.add_argument("run", help="run folder (with model/) or a saved model folder (any method)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default 127.0.0.1, loopback only; there is no authentication: "
                             "bind beyond loopback only on a trusted network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    opt.add_device(parser)
    parser.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE_MB,
                        help=f"largest accepted message; bigger ones close that connection (default "
                             f"{DEFAULT_MAX_MESSAGE_MB:g})")
    parser.add_argument("--max-batch", type=opt.positive_int, default=DEFAULT_MAX_BATCH,
                        help=f"largest batch an 'infer' request may carry (default {DEFAULT_MAX_BATCH})")
    opt.add_threads(parser, opt.EVAL_THREADS, opt.EVAL_THREADS_HELP)
    opt.add_sampler(parser)
    opt.add_matmul_precision(parser)
    parser.add_argument("--verbose", action="store_true", help="log every connection")
    check_group = parser.add_argument_group("end-to-end check (no robot needed)")
    check_group.add_argument("--check", nargs="?", const="", default=None, metavar="ENV",
                             help="serve on a free loopback port and drive a simulated robot through the client "
                                  "(ENV default: the task the model was trained on)")
    check_group.add_argument("--episodes", type=opt.positive_int, default=3,
                             help="--check: seeded episodes (default 3)")
    opt.add_seed(check_group, 100_000, "--check: episode i uses env seed SEED+i (default 100000)")
    check_group.add_argument("--max-steps", type=opt.positive_int, default=None, help="--check: episode step limit")
    check_group.add_argument("--ahead", type=int, default=0,
                             help="--check: request the next chunk when this many actions are left (default 0)")
    check_group.add_argument("--hz", type=float, default=None, help="--check: control rate (default: unpaced)")
    check_group.add_argument("--server-loop", action="store_true",
                             help="--check: server-side receding horizon ('act') instead of the client broker")
    opt.add_out(check_group, "--check: also write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:  # a failed handshake (a port scanner, a browser) is not worth a traceback
        logging.getLogger("dapolicy.serve.ws").addFilter(
            lambda record: not str(record.msg).startswith("opening handshake failed"))
    from dapolicy.cli_options import apply_matmul_precision, apply_sampler
    from dapolicy.runtime import torch_threads

    apply_sampler(args.sampler)
    apply_matmul_precision(args.matmul_precision)
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """`run` with torch's threads set: the check, or the server until it is stopped."""
    if args.check is not None:
        result = check(args.run, env=args.check or None, episodes=args.episodes, seed=args.seed,
                       max_steps=args.max_steps, ahead=args.ahead, hz=args.hz, server_loop=args.server_loop,
                       device=args.device, max_message_mb=args.max_message_mb)
        print(format_check(result))
        if args.out:
            from dapolicy.atomic import write_json_atomic

            write_json_atomic(Path(args.out), result)
            print(f"wrote {args.out}")
        return 0
    from dapolicy.evaluate import load_policy
    from dapolicy.policies.registry import resolve_model_dir

    if args.host not in LOOPBACK_HOSTS:
        print(f"WARNING: listening on {args.host}: the server has no authentication or encryption; anyone who "
              f"can reach port {args.port} can read the model's outputs and command the robot. Use a trusted "
              f"network, a firewall or an SSH tunnel.", flush=True)
    model_dir = resolve_model_dir(args.run)
    server = PolicyServer(load_policy(args.run, args.device), max_message_mb=args.max_message_mb,
                          max_batch=args.max_batch, model_dir=model_dir)
    return serve_forever(server, args.host, args.port)

