"""The fast sampler behind `predict_chunk` of FM and DAP: Algorithm 1 with every per-call constant hoisted.

`policies/coupling.py::coupled_generation` is the readable reference of Algorithm 1; this module computes the
same numbers (up to float rounding, checked by tests/policies/test_fast_sampler.py) with less work:

* computed once per call instead of at every flow step: the observation encoders and the observation
  tokens' keys/values (as before), the null next-observation tokens' keys/values (merged with the
  observation's, so null steps attend to one pre-built group), every tau-dependent quantity (tau embedding,
  all FiLM and adaLN projections, for the K known flow times at once), the clean current latents' half of
  the dynamics model's patch embedding, its proprio token and its whole null-action context;
* per step, the changing tokens (predicted next observation, action estimate) are projected to the keys and
  values of all attention layers in one fused matmul;
* no dynamics call whose output nobody reads: the last Jacobi / Gauss-Seidel dynamics call only produces the
  final latent, needed only for predicted frames or a trace (so at K = 1 those modes call no dynamics at
  all, and prepare none); a ResNet-encoder model encodes only the current frame to latents, and only when a
  dynamics call needs it;
* with a ResNet encoder, a Jacobi call's two chains overlap from the start: on a CPU the dynamics side
  (VAE-encode the current frame, prepare the DiT's per-call constants) runs on the worker beside the policy
  side (ResNet tokens, the observation's keys/values); on a GPU the VAE runs on the side stream;
* the model steps and the observation encoders run as frozen TorchScript traces (no Python per layer,
  weight reshapes folded, no GIL held), see `SamplerOptions.trace`;
* the policy and dynamics calls of one Jacobi step are independent and run concurrently (CPU: a worker
  thread, one intra-op thread per model, a traced call holds no GIL; GPU: a side stream inside the graph),
  see `SamplerOptions.parallel`;
* on a GPU the whole call (encoders and K flow steps) is captured once as a CUDA graph and replayed: at
  batch 1 the GPU is otherwise bound by kernel launches (`SamplerOptions.cuda_graph`, `GraphRunner`);
* `torch.inference_mode` (no autograd bookkeeping).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dapolicy.flow import euler_step, extrapolate, time_grid
from dapolicy.nn.attention import KV, fused_kv_weights, split_fused_kv
from dapolicy.nn.dit import DiTPrepared
from dapolicy.policies.base import validated_inputs
from dapolicy.policies.coupling import COUPLING_MODES, CouplingTrace

StepFn = Callable[[Tensor, int, "Tensor | None"], Tensor]
_MISSING = object()


@dataclass(frozen=True)
class SamplerOptions:
    """How the fast sampler runs (results do not depend on it, up to float rounding).

    trace: run the model steps and the observation encoders as frozen TorchScript traces (`TraceRunner`).
        "auto" = on a CPU, from the second call with unchanged weights (a one-off call does not pay the ~1-3 s
        tracing), for models up to `AUTO_TRACE_MAX_PARAMETERS`; "on" / "off"; "compile" = `torch.compile`
        instead (`CompileRunner`, opt-in: on the 2-core CPU a compiled U-Net step was 2x slower than the
        frozen trace).
    parallel: run the dynamics and policy calls of a Jacobi step concurrently. "auto" = on a CPU with at
        least 2 cores when the steps run as traces (they hold no GIL), each model with half of torch's
        intra-op threads (at least 1), and on a GPU inside a captured CUDA graph (a side stream there costs
        no launches: at the paper size, batch 1, K = 10 on an H100 37 ms against 48 ms in one stream); "on"
        forces it (CUDA without a graph: a side stream, slower than one stream when launch-bound); "off".
    cuda_graph: replay a whole sampling call (encoders, K flow steps) as one captured CUDA graph
        (`GraphRunner`): at batch 1 a GPU call is bound by kernel launches, which a replay issues at once.
        "auto" = on a CUDA device, from the second call of a signature with unchanged weights (one graph
        per mode, K, batch and output set, at most `GraphRunner.MAX_GRAPHS`; never for a call that records
        a trace, nor for weights made under inference mode, whose changes cannot be told); "on" = from the
        first call; "off". Falls back to eager, with a warning, where capture fails.
    threads: intra-op threads per model while sampling on a CPU (torch's setting is restored afterwards).
        "auto" = 1 at batch 1 (measured faster than one thread per core in every mode, idle or loaded: the
        ops are too small to split, and OpenMP barriers stall badly on a shared machine), half of torch's
        setting per model for a concurrent Jacobi call, else torch's setting; "torch" = torch's setting
        (halved per model when concurrent); an int = that many per model.
    """

    trace: str = "auto"
    parallel: str = "auto"
    threads: str | int = "auto"
    cuda_graph: str = "auto"

    def __post_init__(self) -> None:
        if not (self.threads in ("auto", "torch") or (isinstance(self.threads, int) and self.threads >= 1)):
            raise ValueError(f"threads must be 'auto', 'torch' or an int >= 1, got {self.threads!r}")
        if self.trace not in ("auto", "on", "off", "compile"):
            raise ValueError(f"trace must be 'auto', 'on', 'off' or 'compile', got {self.trace!r}")
        if self.parallel not in ("auto", "on", "off"):
            raise ValueError(f"parallel must be 'auto', 'on' or 'off', got {self.parallel!r}")
        if self.cuda_graph not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graph must be 'auto', 'on' or 'off', got {self.cuda_graph!r}")


_DEFAULT = SamplerOptions()
_OPTIONS: "weakref.WeakKeyDictionary[Any, SamplerOptions]" = weakref.WeakKeyDictionary()
_STATES: "weakref.WeakKeyDictionary[Any, SamplerState]" = weakref.WeakKeyDictionary()


def set_options(policy: Any | None = None, **changes: Any) -> SamplerOptions:
    """Change the sampler options of one policy (or the default of all policies when `policy` is None)."""
    global _DEFAULT
    if policy is None:
        _DEFAULT = replace(_DEFAULT, **changes)
        return _DEFAULT
    _OPTIONS[policy] = replace(get_options(policy), **changes)
    return _OPTIONS[policy]


def get_options(policy: Any | None = None) -> SamplerOptions:
    """The options of `policy` (the default when it has none of its own, or when `policy` is None)."""
    return _DEFAULT if policy is None else _OPTIONS.get(policy, _DEFAULT)


# ---------------------------------------------------------------------------------------------- model steps
Runner = Callable[[str, nn.Module, Callable[..., Tensor], list[Tensor]], Tensor]


def run_eager(kind: str, owner: nn.Module, fn: Callable[..., Tensor], flat: list[Tensor]) -> Tensor:
    """The default runner: call the step function in Python."""
    return fn(*flat)


def _pairs(flat: tuple[Tensor, ...] | list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


class PolicyStep:
    """v_A(A, tau_k, Z_hat | None) of a prepared call of the policy U-Net (FM or DAP's policy network).

    The step functions take flat tensor lists (state, then per-step and per-call constants) so a runner can
    replace them by a frozen TorchScript trace; they read nothing else of the call.
    """

    def __init__(self, policy_net: nn.Module, tokens: Tensor, taus: Tensor, runner: Runner = run_eager,
                 constants: Callable[[Any, Callable[[], Any]], Any] | None = None,
                 next_tokens: Callable[[Tensor, int], Tensor] | None = None,
                 next_tokens_owner: nn.Module | None = None) -> None:
        self.net = policy_net
        # next latents -> the policy's tokens, and the module holding every weight that reads (for tracing)
        self.next_tokens = next_tokens or policy_net.next_tokens
        self.next_tokens_owner = next_tokens_owner or policy_net
        self.unet = unet = policy_net.unet
        self.runner = runner
        b = tokens.shape[0]
        self.layers = layers = unet.context_layers()
        cached = constants or (lambda key, make: make())
        k = taus.shape[0]
        self.films = cached(("films", k), lambda: [[t for film in films for t in film]
                                                    for films in unet.prepare_films(taus)])
        self.n_films = len(self.films[0])
        self.kv_weight, self.kv_bias = cached("policy_kv", lambda: fused_kv_weights(layers))
        # the observation's keys/values for every attention layer: one fused projection per call
        static = split_fused_kv(F.linear(unet.context_norm(tokens), self.kv_weight, self.kv_bias), layers)
        self.static = [t for kv in static for t in kv]
        self.null = self.static
        self.null_groups = 1  # key/value groups per attention layer in `null`
        if policy_net.with_next_obs:  # null next observation: a constant group, merged with the static one once
            null = cached("null_next", lambda: split_fused_kv(
                F.linear(unet.context_norm(policy_net.null_next[None]), self.kv_weight, self.kv_bias), layers))
            if unet.cfg.gated_dynamic_context:  # its own softmax: the groups stay apart
                self.null = [t for s, n in zip(static, null) for t in (*s, *_expand(n, b))]
                self.null_groups = 2
            else:
                self.null = [t for s, n in zip(static, null) for t in _cat_kv(s, _expand(n, b))]

    def __call__(self, a: Tensor, step: int, z_hat: Tensor | None) -> Tensor:
        return self.with_context(a, step, self.null if z_hat is None else self.context(z_hat))

    def context(self, z_hat: Tensor) -> list[Tensor]:
        """The attention context given a next-latent estimate: per layer the (k, v) groups, flat, in the
        layout of `self.null` (static and next-observation tokens merged, or two groups when gated).

        Separate from `with_context` so a concurrent Jacobi step can build step k + 1's context in the
        dynamics worker right after it produced the estimate, off the policy's critical path.
        """
        flat = [z_hat, *self.static, self.kv_weight, self.kv_bias]
        return list(self.runner("policy_context", self.next_tokens_owner, self.context_step, flat))

    def with_context(self, a: Tensor, step: int, context: list[Tensor]) -> Tensor:
        """v_A at flow step `step` given a context from `context` (or `self.null`)."""
        return self.runner("policy_step", self.net, self.step_given_context, [a, *self.films[step], *context])

    def step_given_context(self, a: Tensor, *rest: Tensor) -> Tensor:
        films, pairs = _pairs(rest[:self.n_films]), _pairs(rest[self.n_films:])
        g = self.null_groups
        kvs = [pairs[i:i + g] for i in range(0, len(pairs), g)]
        return self.unet.forward_prepared(a, films, kvs)

    def context_step(self, z_hat: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        static = _pairs(rest[:-2])
        tokens = self.unet.context_norm(self.next_tokens(z_hat, z_hat.shape[0]))
        dynamic = split_fused_kv(F.linear(tokens, rest[-2], rest[-1]), self.layers)
        if self.null_groups == 2:
            return tuple(t for s, d in zip(static, dynamic) for t in (*s, *d))
        return tuple(t for s, d in zip(static, dynamic) for t in _cat_kv(s, d))


class DynamicsStep:
    """v_Z(Z, tau_k, A_hat | None) of a prepared call of the latent dynamics DiT (flat-tensor steps as above)."""

    def __init__(self, dynamics: nn.Module, current: Tensor, proprio: Tensor, taus: Tensor,
                 runner: Runner = run_eager, constants: Callable[[Any, Callable[[], Any]], Any] | None = None,
                 action_map: tuple[Tensor, Tensor] | None = None) -> None:
        self.model = dynamics
        self.action_map = action_map  # (scale, shift): the policy's action units -> the dynamics model's
        self.runner = runner
        cached = constants or (lambda key, make: make())
        tables = cached(("dynamics", taus.shape[0]), lambda: dynamics.inference_constants(taus))
        prep = dynamics.prepare_inference(current, proprio, taus, tables)
        self.n_blocks, self.n_ada = len(prep.steps[0][0]), len(prep.steps[0][0][0])
        self.steps = cached(("dynamics_flat", taus.shape[0]), lambda: [
            [t for ada in blocks for t in ada] + list(final) for blocks, final in prep.steps])
        self.calls = [prep.noisy_weight, prep.x_current, prep.kv_weight, prep.kv_bias]
        self.null = [t for kv in prep.null_kv for t in kv]
        self.has_proprio = prep.proprio_kv is not None
        if self.has_proprio:
            self.calls.append(prep.proprio_kv)

    def __call__(self, z: Tensor, step: int, a_hat: Tensor | None) -> Tensor:
        if a_hat is None:
            return self.runner("dynamics_null", self.model, self.null_step, [z, *self.steps[step], *self.calls,
                                                                              *self.null])
        if self.action_map is not None:
            a_hat = a_hat * self.action_map[0] + self.action_map[1]
        return self.runner("dynamics_action", self.model, self.action_step, [z, a_hat, *self.steps[step],
                                                                             *self.calls])

    def _prep(self, rest: tuple[Tensor, ...]) -> DiTPrepared:
        n_step = self.n_ada * self.n_blocks + 2
        step, rest = rest[:n_step], rest[n_step:]
        blocks = tuple(tuple(step[i:i + self.n_ada]) for i in range(0, n_step - 2, self.n_ada))
        n_call = 5 if self.has_proprio else 4
        calls, rest = rest[:n_call], rest[n_call:]
        return DiTPrepared(calls[0], calls[1], [(blocks, (step[-2], step[-1]))], calls[2], calls[3],
                           calls[4] if self.has_proprio else None, _pairs(rest))

    def null_step(self, z: Tensor, *rest: Tensor) -> Tensor:
        return self.model.forward_prepared(z, self._prep(rest), 0, None)

    def action_step(self, z: Tensor, a_hat: Tensor, *rest: Tensor) -> Tensor:
        return self.model.forward_prepared(z, self._prep(rest), 0, a_hat)


class _TraceModule(nn.Module):
    """Holds the model whose weights a step function reads, so tracing sees them as parameters to freeze."""

    def __init__(self, owner: nn.Module, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *flat: Tensor) -> Tensor:
        return self.fn(*flat)


class TraceRunner:
    """Runs step functions as frozen TorchScript traces: one per step kind and input signature.

    At batch 1 most of an eager U-Net step is Python and dispatch overhead; a frozen trace removes the Python
    part, folds weight reshapes into constants, and runs without the GIL (so the two models of a Jacobi step
    really run in parallel). The weights are frozen in: `SamplerState` drops the runner when they change.
    """

    _build_lock = threading.Lock()  # one trace at a time (warning filters are process-wide)

    def __init__(self) -> None:
        self.traces: dict[tuple, Callable[..., Tensor]] = {}

    def __call__(self, kind: str, owner: nn.Module, fn: Callable[..., Tensor], flat: list[Tensor]) -> Tensor:
        # The first two inputs (a model step's state, or an encoder's images and proprio: batch included) and
        # the weights fix every other input's shape, so they key the trace; hashing ~60 shapes would cost
        # ~25 us per call.
        key = (kind, len(flat), flat[0].device, flat[0].dtype, *(tuple(t.shape) for t in flat[:2]))
        traced = self.traces.get(key)
        if traced is None:
            traced = self.traces[key] = self._build(owner, fn, flat)
        return fn(*flat) if traced is _EAGER else traced(*flat)

    def _build(self, owner: nn.Module, fn: Callable[..., Tensor], flat: list[Tensor]) -> Any:
        """A frozen trace of fn, or `_EAGER` where TorchScript cannot trace it (then each call runs its own fn,
        with a warning once; nothing here keeps a reference to the model)."""
        with self._build_lock:
            was_training = owner.training
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # shape-dependent Python values are baked in: shapes are keyed
                    module = _TraceModule(owner, fn).eval()
                    return torch.jit.freeze(torch.jit.trace(module, tuple(flat), check_trace=False))
            except Exception as err:  # TorchScript is deprecated upstream: never let it break sampling
                warnings.warn(f"fast sampler: tracing failed ({type(err).__name__}: {err}); running eagerly",
                              RuntimeWarning, stacklevel=3)
                return _EAGER
            finally:
                owner.train(was_training)  # tracing needs eval mode; the caller's mode is the caller's


#: In `TraceRunner.traces`: this signature could not be traced; run each call's own step function.
_EAGER: Any = object()


class CompileRunner(TraceRunner):
    """Runs step functions through `torch.compile` (one compiled function per step kind and signature).

    Opt-in (`trace="compile"`): on the 2-core CPU a compiled small U-Net step took 3.5 ms against 1.8 ms for the
    frozen trace (and ~25 s to compile); it may pay off on a GPU. Dynamo is not thread-safe, so a compiled
    Jacobi call never runs its two models in two threads (`_parallel`). The compiled function holds the first
    call's step object (and so the model) until the weights change.
    """

    def _build(self, owner: nn.Module, fn: Callable[..., Tensor], flat: list[Tensor]) -> Callable[..., Tensor]:
        return torch.compile(fn, dynamic=False)


class SamplerState:
    """Per policy: a fingerprint of its weights, what was computed from the weights alone, and the traces.

    Everything is dropped when any parameter or buffer changes (in-place updates bump tensor versions; moves
    change storages; replaced tensors are read afresh from the modules' dicts). A write through `param.data`
    bumps nothing: after one, call `forget(policy)` (the library's own weight writes all bump versions).
    """

    def __init__(self) -> None:
        self.fingerprint: tuple | None = None
        self.calls = 0  # sampling calls with the current weights
        self.constants: dict[Any, Any] = {}
        # a Jacobi call prepares its two models in two threads (`_encode_observation`), both filling `constants`
        self._constants_lock = threading.RLock()
        self.traces = TraceRunner()
        # the modules' parameter and buffer dicts, not the modules: this state is the value of a weak dict keyed
        # by the policy, so holding the policy (or any module, which a bound method could lead back to) here
        # would keep every policy ever sampled alive
        self._tensor_dicts: list[dict[str, Tensor | None]] | None = None
        self._epoch = -1

    def begin_call(self, policy: nn.Module, compile: bool = False) -> int:
        """Note a sampling call; returns how many calls (this one included) saw the current weights."""
        key = self._fingerprint(policy)
        runner = CompileRunner if compile else TraceRunner
        if key is None or key != self.fingerprint or type(self.traces) is not runner:
            self.fingerprint, self.calls = key, 0
            self.constants.clear()
            self.traces = runner()
        self.calls += 1
        return self.calls

    def constant(self, key: Any, make: Callable[[], Any]) -> Any:
        """`make()` once per weights (inference tensors: computed under inference mode); thread-safe."""
        found = self.constants.get(key, _MISSING)
        if found is not _MISSING:
            return found
        with self._constants_lock:
            if key not in self.constants:
                self.constants[key] = make()
            return self.constants[key]

    def _fingerprint(self, policy: nn.Module) -> tuple | None:
        """Storages and version counters of every weight, or None where that cannot tell a change (inference
        tensors have no version counter: then nothing is cached across calls)."""
        if self._tensor_dicts is None or self._epoch != _STRUCTURE_EPOCH[0] or _STRUCTURE_EPOCH[0] < 0:
            self._tensor_dicts = [group for m in policy.modules() for group in (m._parameters, m._buffers)]
            self._epoch = _STRUCTURE_EPOCH[0]
        try:
            return tuple((t.data_ptr(), t._version) for group in self._tensor_dicts for t in group.values()
                         if t is not None)
        except RuntimeError:  # "Inference tensors do not track version counter": built under inference_mode
            return None


# Submodules added or replaced anywhere bump this (the fingerprint then walks the module tree again); -1 =
# this torch has no registration hooks: walk every time.
_STRUCTURE_EPOCH = [0]


def _structure_changed(*args: Any) -> None:
    _STRUCTURE_EPOCH[0] += 1


try:
    from torch.nn.modules.module import register_module_module_registration_hook

    register_module_module_registration_hook(_structure_changed)
except ImportError:  # torch < 2.0
    _STRUCTURE_EPOCH[0] = -1


def _expand(kv: KV, b: int) -> KV:
    k, v = kv
    return kv if k.shape[0] == b else (k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:]))


def _cat_kv(a: KV, b: KV) -> KV:
    return torch.cat([a[0], b[0]], dim=2), torch.cat([a[1], b[1]], dim=2)


# ---------------------------------------------------------------------------------------------- Algorithm 1
class Concurrent:
    """Runs the dynamics call of a Jacobi step beside the policy call (CPU: a worker thread; CUDA: a stream).

    On a CPU the worker runs its model with `threads` intra-op threads (the caller sets its own, see
    `SamplerOptions.threads`): two models at one thread each use two cores without oversubscribing them.
    """

    _pool: ThreadPoolExecutor | None = None
    _lock = threading.Lock()

    def __init__(self, device: torch.device, threads: int = 1) -> None:
        self.device = device
        self.threads = threads
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @classmethod
    def pool(cls) -> ThreadPoolExecutor:
        with cls._lock:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dap-dynamics")
            return cls._pool

    def both(self, first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
        """(first(), second()) with `second` run concurrently."""
        if self.stream is not None:
            main = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                out2 = second()
            out1 = first()
            main.wait_stream(self.stream)
            _record_stream(out2, main)
            return out1, out2
        threads = self.threads

        def run_second() -> Any:
            if torch.get_num_threads() != threads:  # the worker's own intra-op setting (per OS thread)
                torch.set_num_threads(threads)
            with torch.inference_mode():
                return second()

        # in the caller's context: context variables (e.g. `validated_inputs`) hold in the worker too, so a
        # trace built there records what one built in the caller would
        future = self.pool().submit(contextvars.copy_context().run, run_second)
        try:
            out1 = first()
        finally:  # joined even when `first` raises: the worker never outlives the call
            out2 = future.result()
        return out1, out2


def _record_stream(out: Any, stream: Any) -> None:
    """Mark every tensor of a (nested) result as used on `stream` (the caching allocator's rule)."""
    if isinstance(out, Tensor):
        out.record_stream(stream)
    elif isinstance(out, (list, tuple)):
        for item in out:
            _record_stream(item, stream)


def sample(policy_step: PolicyStep, dynamics_step: StepFn | None, z_noise: Tensor | None, a_noise: Tensor, steps: int,
           mode: str, need_latents: bool, trace: CouplingTrace | None = None,
           concurrent: Concurrent | None = None) -> tuple[Tensor, Tensor | None]:
    """Algorithm 1 (`coupling.coupled_generation`) on prepared steps; step functions take the step index.

    need_latents: the final next latents are used (predicted frames); otherwise the last coupled step skips
    its dynamics call and the returned latents are None. A trace also needs every dynamics call.
    """
    dt = 1.0 / steps
    taus = time_grid(steps)
    if mode not in COUPLING_MODES:
        raise ValueError(f"unknown coupling mode {mode!r} (modes: {', '.join(COUPLING_MODES)})")
    if mode == "off":
        return _policy_only(policy_step, a_noise, taus, None, trace), None
    need_all = need_latents or trace is not None
    if (dynamics_step is None or z_noise is None) and calls_dynamics(mode, steps, need_all):
        raise ValueError(f"mode {mode!r} at K = {steps} needs a dynamics model")
    if mode == "predict_then_act":
        z = z_noise
        for k in range(steps):
            z = euler_step(z, dynamics_step(z, k, None), dt)
        return _policy_only(policy_step, a_noise, taus, z, trace), z
    if mode == "jacobi":
        return _jacobi(policy_step, dynamics_step, z_noise, a_noise, steps, need_all, trace, concurrent)
    z, a = z_noise, a_noise  # Gauss-Seidel: the dynamics call waits for this step's action estimate
    z_hat: Tensor | None = None
    for k, tau in enumerate(taus):
        v_a = policy_step(a, k, z_hat)
        a_hat = extrapolate(a, v_a, tau)
        v_z = dynamics_step(z, k, a_hat) if need_all or k < steps - 1 else None
        a = euler_step(a, v_a, dt)
        if v_z is not None:
            z_hat = extrapolate(z, v_z, tau)
            z = euler_step(z, v_z, dt)
        if trace is not None:
            trace.record(tau, z_hat, a_hat)
    return a, (z if need_all else None)


def calls_dynamics(mode: str, steps: int, need_all: bool) -> bool:
    """Whether sampling in `mode` with K = `steps` calls the dynamics model at all: Jacobi and Gauss-Seidel
    skip the last step's call unless its latents are needed (`need_all`), so at K = 1 they make none."""
    if mode == "off":
        return False
    return mode == "predict_then_act" or steps > 1 or need_all


def _jacobi(policy_step: PolicyStep, dynamics_step: StepFn | None, z: Tensor, a: Tensor, steps: int,
            need_all: bool, trace: CouplingTrace | None, concurrent: Concurrent | None) -> tuple[Tensor, Tensor | None]:
    """Jacobi sampling: each step's two model calls see the other's estimate of the previous step, so they
    run concurrently when `concurrent` is given (one after the other otherwise).

    The dynamics call also turns its fresh estimate into the policy's attention context for the next step
    (`PolicyStep.context`: tokens, keys/values, merged with the observation's), which in the concurrent case
    takes that work off the policy's path, the longer of the two at batch 1.
    """
    both = concurrent.both if concurrent is not None else _one_then_other
    dt = 1.0 / steps
    context = policy_step.null  # step 0 sees no estimate
    z_hat: Tensor | None = None
    a_hat: Tensor | None = None
    for k, tau in enumerate(time_grid(steps)):
        if need_all or k < steps - 1:
            def dynamics(z_in: Tensor = z, a_cond: Tensor | None = a_hat, kk: int = k,
                         t: float = tau) -> tuple[Tensor, Tensor, list[Tensor] | None]:
                v = dynamics_step(z_in, kk, a_cond)
                estimate = extrapolate(z_in, v, t)
                return v, estimate, (policy_step.context(estimate) if kk < steps - 1 else None)

            v_a, (v_z, z_hat, next_context) = both(
                lambda a_in=a, kk=k, ctx=context: policy_step.with_context(a_in, kk, ctx), dynamics)
            z = euler_step(z, v_z, dt)
            context = next_context
        else:
            v_a = policy_step.with_context(a, k, context)
        a_hat = extrapolate(a, v_a, tau)
        a = euler_step(a, v_a, dt)
        if trace is not None:
            trace.record(tau, z_hat, a_hat)
    return a, (z if need_all else None)


def _one_then_other(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    return first(), second()


def _policy_only(policy_step: StepFn, a: Tensor, taus: list[float], z_cond: Tensor | None,
                 trace: CouplingTrace | None) -> Tensor:
    dt = 1.0 / len(taus)
    for k, tau in enumerate(taus):
        v_a = policy_step(a, k, z_cond)
        if trace is not None:
            trace.record(tau, z_cond, extrapolate(a, v_a, tau))
        a = euler_step(a, v_a, dt)
    return a


# ---------------------------------------------------------------------------------------------- predict
def forget(policy: nn.Module) -> None:
    """Drop what was computed from the policy's weights (traces, constants): needed only after writing weights
    in a way that bumps no version counter, e.g. through `param.data`."""
    _STATES.pop(policy, None)


def _state(policy: nn.Module) -> SamplerState:
    state = _STATES.get(policy)
    if state is None:
        state = _STATES[policy] = SamplerState()
    return state


#: "auto" tracing skips models this large: they are compute-bound (little Python overhead to remove) and a
#: frozen trace holds its own copy of the weights it folds.
AUTO_TRACE_MAX_PARAMETERS = 20_000_000


def _runner(state: SamplerState, policy: nn.Module, options: SamplerOptions, device: torch.device) -> Runner:
    """The trace runner when tracing is on for this call (see `SamplerOptions.trace`), else eager."""
    if options.trace in ("on", "compile"):
        return state.traces
    if options.trace == "auto" and device.type == "cpu" and state.calls >= 2:
        size = state.constant("parameters", lambda: sum(p.numel() for p in policy.parameters()))
        return state.traces if size <= AUTO_TRACE_MAX_PARAMETERS else run_eager
    return run_eager


def _parallel(options: SamplerOptions, device: torch.device, runner: Runner) -> bool:
    """Whether a Jacobi call runs its two models concurrently (see `SamplerOptions.parallel`)."""
    if device.type == "cpu" and isinstance(runner, CompileRunner):
        return False  # two threads would run dynamo at once, which is not thread-safe
    if options.parallel != "auto":
        return options.parallel == "on"
    return device.type == "cpu" and runner is not run_eager and _available_cores() >= 2


def _threads_per_model(options: SamplerOptions, device: torch.device, batch: int, parallel: bool) -> int | None:
    """Intra-op threads per model for this call (None = leave torch's setting), see `SamplerOptions.threads`."""
    if device.type != "cpu":
        return None
    if isinstance(options.threads, int):
        return options.threads
    if options.threads == "auto" and batch == 1:
        return 1
    return max(1, torch.get_num_threads() // 2) if parallel else None


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: unchanged) in this block, restored afterwards."""
    saved = torch.get_num_threads()
    if threads is None or threads == saved:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _encode_observation(policy: Any, batch: dict[str, Tensor], dynamics_needs_latents: bool,
                        concurrent: Concurrent | None, runner: Runner = run_eager,
                        with_tokens: Callable[[Tensor], Any] = lambda tokens: tokens,
                        with_latents: Callable[[Tensor], Any] = lambda latents: latents) -> tuple[Any, Any]:
    """(with_tokens(the policy's observation tokens), with_latents(the current latents the dynamics model
    starts from)); the second is None when the dynamics model is not needed.

    With the "vae" encoder both come from one VAE pass. With "resnet" the VAE encodes only the last frame, for
    the dynamics model, and on a CPU that chain (latents, then `with_latents`, i.e. preparing the dynamics
    step) runs on a Jacobi call's worker beside the policy's (ResNet tokens, then `with_tokens`): neither reads
    the other's results (they share only the per-weights caches, `SamplerState.constant` and the traces,
    under distinct keys).
    Both encoders run through `runner`, as the model steps do (with `TraceRunner`: ~1 ms less per chunk for
    the ResNet on the 2-core CPU, and no GIL held, so the two chains overlap).
    """
    images, proprio = batch["images"], batch["proprio"]
    if policy.config.obs_encoder == "vae":
        def vae_tokens(images: Tensor, proprio: Tensor) -> tuple[Tensor, Tensor]:
            latents = policy.encode_latents(images)
            return policy.observation_tokens({"images": images, "proprio": proprio, "latents": latents},
                                             augment=False), latents[:, -1]

        out = runner("observation_vae", policy, vae_tokens, [images, proprio])
        return with_tokens(out[0]), (with_latents(out[1]) if dynamics_needs_latents else None)

    def resnet_tokens(images: Tensor, proprio: Tensor) -> Tensor:
        return policy.observation_tokens({"images": images, "proprio": proprio}, augment=False)

    def tokens() -> Tensor:
        return runner("observation_resnet", policy, resnet_tokens, [images, proprio])

    if not dynamics_needs_latents:
        return with_tokens(tokens()), None

    def latents() -> Tensor:
        return runner("current_latents", policy, policy.encode_latents, [images[:, -1]])

    if concurrent is None:
        return with_tokens(tokens()), with_latents(latents())
    if concurrent.stream is not None:  # CUDA: the side stream only encodes; the preparations use the main one
        policy_side, current = concurrent.both(lambda: with_tokens(tokens()), latents)
        return policy_side, with_latents(current)
    return concurrent.both(lambda: with_tokens(tokens()), lambda: with_latents(latents()))


def predict(policy: Any, batch: dict[str, Tensor], return_next: bool, mode: str, steps: int, return_trace: bool,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor | None, dict | None]:
    """Sample one chunk for an FM or DAP policy on a validated batch.

    Returns (actions in normalised units [B, H, A], predicted next latents [B, C, c, h, w] or None, trace).
    The noise is drawn in the reference's order (next-latent noise first, for DAP in every mode), so a
    seeded call gives the reference's result.
    """
    coupled = getattr(policy, "dynamics", None) is not None
    if mode not in (COUPLING_MODES if coupled else ("off",)):
        raise ValueError(f"unknown generation mode {mode!r}")
    options = get_options(policy)
    dev = policy.device
    state = _state(policy)
    state.begin_call(policy, compile=options.trace == "compile")
    b = batch["proprio"].shape[0]
    with torch.inference_mode():  # the noise first, in the reference's order: next latents, then actions
        z0 = None
        if coupled:
            z0 = torch.randn((b, len(policy.spec.cameras), policy.latent_channels, policy.latent_size,
                              policy.latent_size), generator=generator, device=dev)
        a0 = torch.randn((b, policy.config.horizon, policy.spec.action_dim), generator=generator, device=dev)
    inputs = {**batch, "a0": a0, **({"z0": z0} if z0 is not None else {})}
    if _graphs_allowed(options, dev, return_trace) and state.fingerprint is not None:
        key = (mode, steps, return_next, _numerics(),
               tuple((k, tuple(t.shape), t.dtype) for k, t in sorted(inputs.items())))
        graphs = state.constant("cuda_graphs", lambda: GraphRunner(dev))
        a, z = graphs(key, lambda x: _predict_body(policy, state, options, x, return_next, mode, steps, None,
                                                   graphed=True), inputs, first_use=options.cuda_graph == "on")
        return a, z, None
    trace = CouplingTrace() if return_trace else None
    a, z = _predict_body(policy, state, options, inputs, return_next, mode, steps, trace)
    return a, z, (trace.as_dict() if trace is not None else None)


def _predict_body(policy: Any, state: SamplerState, options: SamplerOptions, inputs: dict[str, Tensor],
                  return_next: bool, mode: str, steps: int, trace: CouplingTrace | None,
                  graphed: bool = False) -> tuple[Tensor, Tensor | None]:
    """Encoders and Algorithm 1 on a validated batch with its noise drawn (`inputs`: the batch, a0 and, for
    DAP, z0): no host-device copy and no host sync, so a CUDA graph can capture it whole."""
    coupled = "z0" in inputs
    dev = policy.device
    batch = {k: v for k, v in inputs.items() if k not in ("a0", "z0")}
    runner = run_eager if graphed else _runner(state, policy, options, dev)
    if graphed:  # a captured side stream costs no launches: the two models' kernels overlap on the GPU
        parallel = coupled and mode == "jacobi" and options.parallel != "off"
    else:
        parallel = coupled and mode == "jacobi" and _parallel(options, dev, runner)
    uses_dynamics = coupled and calls_dynamics(mode, steps, return_next or trace is not None)
    parallel = parallel and uses_dynamics
    b = batch["proprio"].shape[0]
    threads = _threads_per_model(options, dev, b, parallel)
    concurrent = Concurrent(dev, threads or 1) if parallel else None
    with torch.inference_mode(), _intra_op_threads(threads), validated_inputs():
        taus = state.constant(("taus", steps), lambda: torch.tensor(time_grid(steps), device=dev))

        def prepare_policy(tokens: Tensor) -> PolicyStep:
            return PolicyStep(policy.policy_net, tokens, taus, runner, state.constant,
                              getattr(policy, "next_observation_tokens", None), policy)

        def prepare_dynamics(current: Tensor) -> DynamicsStep:
            return DynamicsStep(policy.dynamics, current, policy.dynamics_proprio(batch["proprio"]), taus, runner,
                                state.constant, action_map=policy.policy_to_dynamics_action())

        policy_step, dynamics_step = _encode_observation(policy, batch, uses_dynamics, concurrent, runner,
                                                         prepare_policy, prepare_dynamics)
        return sample(policy_step, dynamics_step, inputs.get("z0"), inputs["a0"], steps, mode,
                      need_latents=return_next, trace=trace, concurrent=concurrent)


def _graphs_allowed(options: SamplerOptions, device: torch.device, return_trace: bool) -> bool:
    """Whether this call may replay a CUDA graph (see `SamplerOptions.cuda_graph`; `GraphRunner` decides
    from which use of a signature on)."""
    return device.type == "cuda" and not return_trace and options.cuda_graph != "off"


def _numerics() -> tuple:
    """The global settings a captured graph bakes in (kernels chosen at capture): part of its key."""
    try:
        autocast = torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4
        autocast = torch.is_autocast_enabled()
    return (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32, autocast)


class GraphRunner:
    """Whole sampling calls captured as CUDA graphs, one per signature (mode, K, output set, global numerics,
    input shapes and dtypes), at most `MAX_GRAPHS` (least recently used dropped first).

    Capture needs static buffers: each call's inputs (the batch and its noise) are copied into the graph's,
    and its outputs are cloned out of the graph's (the next replay overwrites them). A signature is captured
    at its second use ("auto"; a one-off call does not pay for a capture) or its first ("on"). Two warm-up
    calls on a side stream before capture compute the per-weights constants and let the libraries pick their
    kernels; the second runs with host syncs made errors, since a sync cannot be captured and a capture that
    fails midway can leave CUDA's random generator unusable. Capture and replay run on the policy's device,
    whichever device is current. Held in the `SamplerState` constants, so new weights drop the graphs.
    """

    MAX_GRAPHS = 8
    MAX_COUNTED = 64  # signatures whose uses are counted (oldest first out): a long-lived server stays bounded

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graphs: dict[tuple, Any] = {}  # in order of last use
        self.uses: dict[tuple, int] = {}  # in order of first use

    def __call__(self, key: tuple, call: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor | None]],
                 inputs: dict[str, Tensor], first_use: bool = False) -> tuple[Tensor, Tensor | None]:
        with torch.cuda.device(self.device):
            entry = self.graphs.pop(key, None)
            if entry is None:
                self.uses[key] = self.uses.get(key, 0) + 1
                if len(self.uses) > self.MAX_COUNTED:
                    del self.uses[next(iter(self.uses))]
                if self.uses[key] < (1 if first_use else 2):
                    return call(inputs)
                entry = self._capture(call, inputs)
                while len(self.graphs) >= self.MAX_GRAPHS:
                    del self.graphs[next(iter(self.graphs))]
            self.graphs[key] = entry
            if entry is _EAGER:
                return call(inputs)
            graph, static_in, static_out = entry
            with torch.inference_mode():
                for name, tensor in inputs.items():
                    static_in[name].copy_(tensor)
                graph.replay()
                return tuple(None if t is None else t.clone() for t in static_out)

    def _capture(self, call: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor | None]],
                 inputs: dict[str, Tensor]) -> Any:
        main = torch.cuda.current_stream(self.device)
        with torch.inference_mode():
            static_in = {name: t.clone() for name, t in inputs.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        try:
            with torch.inference_mode(), torch.cuda.stream(side):
                call(static_in)
                saved = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    call(static_in)
                finally:
                    torch.cuda.set_sync_debug_mode(saved)
        except Exception as err:
            return _capture_failed(err)
        finally:  # the constants the warm-ups wrote on `side` are read on the main stream from now on
            main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
                static_out = call(static_in)
        except Exception as err:  # never let a capture problem break sampling
            return _capture_failed(err)
        return graph, static_in, static_out


def _capture_failed(err: BaseException) -> Any:
    cause = err.__context__ or err.__cause__  # a capture's own error hides the one that invalidated it
    detail = f"{type(err).__name__}: {err}" + (f" (after {type(cause).__name__}: {cause})" if cause else "")
    warnings.warn(f"fast sampler: CUDA graph capture failed ({detail}); running eagerly", RuntimeWarning,
                  stacklevel=4)
    return _EAGER


def reference_predict(policy: Any, batch: dict[str, Tensor], return_next: bool, mode: str, steps: int,
                      return_trace: bool,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor | None, dict | None]:
    """The same as `predict`, the straightforward way: the models' plain `forward` wired into the reference
    `coupled_generation` (what `_predict` did before this module). For equivalence tests and `dap bench`."""
    from dapolicy.policies.coupling import coupled_generation, sample_policy

    coupled = getattr(policy, "dynamics", None) is not None
    with torch.no_grad():
        if policy.config.obs_encoder == "vae" or (coupled and mode != "off"):
            batch = {**batch, "latents": policy.encode_latents(batch["images"])}
        b = batch["proprio"].shape[0]
        net = policy.policy_net
        context = net.unet.prepare_context(policy.observation_tokens(batch, augment=False))

        def policy_velocity(a: Tensor, tau: float, z_hat: Tensor | None) -> Tensor:
            t = torch.full((b,), tau, device=a.device)
            dynamic = policy.next_observation_tokens(z_hat, b) if net.with_next_obs else None
            return net.unet(a, t, static=context, dynamic_tokens=dynamic)

        dev = policy.device
        trace = CouplingTrace() if return_trace else None
        z0 = None
        if coupled:
            z0 = torch.randn((b, len(policy.spec.cameras), policy.latent_channels, policy.latent_size,
                              policy.latent_size), generator=generator, device=dev)
        a0 = torch.randn((b, policy.config.horizon, policy.spec.action_dim), generator=generator, device=dev)
        if not coupled:
            return sample_policy(policy_velocity, a0, steps, None, trace), None, (trace.as_dict() if trace else None)
        current = batch["latents"][:, -1] if mode != "off" else None
        proprio = policy.dynamics_proprio(batch["proprio"])
        scale, shift = policy.policy_to_dynamics_action()

        def dynamics_velocity(z: Tensor, tau: float, a_hat: Tensor | None) -> Tensor:
            a_dyn = None if a_hat is None else a_hat * scale + shift
            return policy.dynamics(z, torch.full((b,), tau, device=z.device), current, a_dyn, proprio)

        a, z = coupled_generation(dynamics_velocity, policy_velocity, z0, a0, steps, mode, trace)
    return a, (z if return_next else None), (trace.as_dict() if trace is not None else None)
