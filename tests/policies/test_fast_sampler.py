"""The fast sampler computes what the reference Algorithm 1 (`coupling.coupled_generation`) computes.

The reference here is wired by hand from the models' plain `forward` calls, exactly as `_predict` did before
the fast sampler existed; every weight is randomised, since zero-initialised output layers (adaLN-Zero) would
hide wiring bugs. Timing is never asserted (see `dap bench latency`).
"""

import numpy as np
import pytest
import torch
from torch import nn

from dapolicy.policies import fast_sampler, make_config, make_policy
from dapolicy.policies.coupling import COUPLING_MODES, CouplingTrace, coupled_generation, sample_policy
from dapolicy.spec import EnvSpec

SPEC = EnvSpec(name="test", cameras=("a", "b"), image_size=32, action_dim=3, proprio_dim=2, max_steps=10,
               action_low=(-1, -1, -1), action_high=(1, 1, 1))
STEPS = 4
ATOL = 1e-5


def _randomise(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _policy(method: str, device: str = "cpu", **overrides):
    """Random weights, and fitted statistics that differ between the policy (expert-like data) and the
    dynamics model (wider, shifted data): identity normalisers would hide a missing or doubled mapping."""
    torch.manual_seed(0)
    policy = make_policy(method, SPEC, make_config(method, "tiny", overrides))
    _randomise(policy)
    rng = np.random.default_rng(0)
    expert = type("D", (), {"action": rng.uniform(-0.5, 0.4, (40, 3)), "proprio": rng.uniform(0, 1, (40, 2))})
    everything = type("D", (), {"action": rng.uniform(-3, 2, (80, 3)), "proprio": rng.uniform(-2, 3, (80, 2))})
    policy.fit_normalizers(lambda stage: everything if stage == "dynamics" else expert)
    return policy.to(device).eval()


def _obs(b: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 255, (b, 2, 2, 32, 32, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(b, 2, 2)).astype(np.float32)}


@torch.no_grad()
def _reference(policy, obs: dict, mode: str, seed: int, steps: int = STEPS):
    """(actions, next latents, trace) the straightforward way: forward calls into coupled_generation."""
    batch = policy.validate_obs(obs)
    coupled = hasattr(policy, "dynamics")
    if policy.config.obs_encoder == "vae" or (coupled and mode != "off"):
        batch["latents"] = policy.encode_latents(batch["images"])
    b, dev = batch["proprio"].shape[0], policy.device
    net = policy.policy_net
    context = net.unet.prepare_context(policy.observation_tokens(batch, augment=False))

    def policy_velocity(a, tau, z_hat):
        dynamic = policy.next_observation_tokens(z_hat, b) if coupled else None
        return net.unet(a, torch.full((b,), tau, device=dev), static=context, dynamic_tokens=dynamic)

    g = torch.Generator(dev).manual_seed(seed)
    trace = CouplingTrace()
    if not coupled:
        a0 = torch.randn((b, policy.config.horizon, SPEC.action_dim), generator=g, device=dev)
        return sample_policy(policy_velocity, a0, steps, None, trace), None, trace.as_dict()
    z0 = torch.randn((b, 2, policy.latent_channels, policy.latent_size, policy.latent_size), generator=g, device=dev)
    a0 = torch.randn((b, policy.config.horizon, SPEC.action_dim), generator=g, device=dev)
    current = batch["latents"][:, -1] if mode != "off" else None
    proprio = policy.dynamics_proprio(batch["proprio"])  # the dynamics model's own statistics
    scale, shift = policy.policy_to_dynamics_action()  # the policy's action units -> the dynamics model's

    def dynamics_velocity(z, tau, a_hat):
        action = None if a_hat is None else a_hat * scale + shift
        return policy.dynamics(z, torch.full((b,), tau, device=dev), current, action, proprio)

    a, z = coupled_generation(dynamics_velocity, policy_velocity, z0, a0, steps, mode, trace)
    return a, z, trace.as_dict()


def _fast(policy, obs: dict, mode: str, seed: int, return_next: bool = True, return_trace: bool = True,
          steps: int = STEPS):
    batch = policy.validate_obs(obs)
    return fast_sampler.predict(policy, batch, return_next, mode, steps, return_trace,
                                torch.Generator(policy.device).manual_seed(seed))


CASES = [("dap", mode) for mode in COUPLING_MODES] + [("fm", "off")]


@pytest.mark.parametrize("method,mode", CASES)
@pytest.mark.parametrize("run", ["eager", "traced_parallel"])
def test_fast_sampler_matches_the_reference(method, mode, run):
    policy = _policy(method)
    setting = "off" if run == "eager" else "on"
    fast_sampler.set_options(policy, trace=setting, parallel=setting)
    obs = _obs(3)
    a_ref, z_ref, trace_ref = _reference(policy, obs, mode, seed=5)
    a, z, trace = _fast(policy, obs, mode, seed=5)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(trace["a_hat"], trace_ref["a_hat"], rtol=0, atol=ATOL)
    assert trace["tau"] == trace_ref["tau"]
    if z_ref is None:
        assert z is None and trace["z_hat"] is None
    else:
        torch.testing.assert_close(z, z_ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(trace["z_hat"], trace_ref["z_hat"], rtol=0, atol=ATOL)
    # without frames or trace, the actions are the same (the skipped last dynamics call fed nothing else)
    a_only, _, _ = _fast(policy, obs, mode, seed=5, return_next=False, return_trace=False)
    torch.testing.assert_close(a_only, a_ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method,mode", [("fm", "off"), ("dap", "jacobi")])
def test_fast_sampler_matches_the_reference_with_register_tokens(method, mode):
    policy = _policy(method, register_tokens=3)
    fast_sampler.set_options(policy, trace="on", parallel="on")
    obs = _obs(2)
    a_ref, _, _ = _reference(policy, obs, mode, seed=7)
    a, _, _ = _fast(policy, obs, mode, seed=7)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=ATOL)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("method,mode", CASES)
@pytest.mark.parametrize("run", ["eager", "streams", "traced_streams", "graph", "graph_streams"])
def test_fast_sampler_matches_the_reference_on_cuda(method, mode, run, monkeypatch):
    """On a GPU the concurrent Jacobi step runs the dynamics call on a side stream (`Concurrent`), and a
    graphed call replays captured kernels on copied inputs: a missing stream wait or a stale input buffer
    only shows as wrong numbers, so compare them, for two different observations in a row."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 rounding would differ per path
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    policy = _policy(method, device="cuda")
    fast_sampler.set_options(policy, trace="on" if run == "traced_streams" else "off",
                             parallel="off" if run in ("eager", "graph") else "on",
                             cuda_graph="on" if run.startswith("graph") else "off")
    for seed in (0, 1, 0):  # the third call replays the first one's graph on new inputs again
        obs = _obs(3, seed=seed)
        a_ref, z_ref, _ = _reference(policy, obs, mode, seed=5 + seed)
        a, z, _ = _fast(policy, obs, mode, seed=5 + seed, return_trace=False)
        torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-4)
        if z_ref is not None:
            torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-4)
    if run.startswith("graph"):
        (entry,) = fast_sampler._state(policy).constants["cuda_graphs"].graphs.values()
        assert entry is not fast_sampler._EAGER, "the call was not captured"


@CUDA
def test_a_call_that_cannot_be_captured_runs_eagerly_and_leaves_cuda_usable(monkeypatch):
    encode = fast_sampler._encode_observation

    def encode_with_a_host_sync(policy, batch, *args, **kwargs):
        float(batch["images"].sum())  # reads a value back: not capturable
        return encode(policy, batch, *args, **kwargs)

    monkeypatch.setattr(fast_sampler, "_encode_observation", encode_with_a_host_sync)
    policy = _policy("dap", device="cuda")
    fast_sampler.set_options(policy, cuda_graph="on")
    obs = _obs(2)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        a, _, _ = _fast(policy, obs, "jacobi", seed=1, return_trace=False)
    a_ref, _, _ = _reference(policy, obs, "jacobi", seed=1)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-3)
    torch.randn(4, device="cuda")  # the default generator still works
    a_again, _, _ = _fast(policy, obs, "jacobi", seed=1, return_trace=False)  # eager from now on, no warning
    torch.testing.assert_close(a_again, a, rtol=0, atol=0)


@CUDA
def test_cuda_graphs_follow_weight_updates(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    policy = _policy("dap", device="cuda")
    obs = _obs(1)
    for _ in range(3):  # the default: eager first, graphed from the second call with the same weights
        policy.predict_chunk(obs, mode="jacobi", steps=STEPS)
    assert "cuda_graphs" in fast_sampler._state(policy).constants
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.1)
    for _ in range(3):
        a, _, _ = _fast(policy, obs, "jacobi", seed=2, return_trace=False)
    a_ref, _, _ = _reference(policy, obs, "jacobi", seed=2)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_graph_of_a_policy_on_another_gpu_than_the_current_one_is_captured_there(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    policy = _policy("dap", device="cuda:1")
    fast_sampler.set_options(policy, cuda_graph="on")
    obs = _obs(1)
    with torch.cuda.device(0):
        for seed in (0, 1):  # the second replays: an empty graph would return the first call's actions
            a, _, _ = _fast(policy, obs, "jacobi", seed=seed, return_trace=False)
            a_ref, _, _ = _reference(policy, obs, "jacobi", seed=seed)
            torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-4)


def test_cuda_graphs_are_allowed_on_a_gpu_only_and_not_for_traced_calls():
    allowed, cuda, cpu = fast_sampler._graphs_allowed, torch.device("cuda"), torch.device("cpu")
    auto, on, off = (fast_sampler.SamplerOptions(cuda_graph=v) for v in ("auto", "on", "off"))
    assert allowed(auto, cuda, False) and allowed(on, cuda, False)
    assert not allowed(auto, cuda, True)  # a traced call records per-step tensors in Python
    assert not allowed(off, cuda, False) and not allowed(on, cpu, False)
    with pytest.raises(ValueError, match="cuda_graph"):
        fast_sampler.SamplerOptions(cuda_graph="maybe")


def test_graph_runner_captures_a_signature_at_its_second_use_and_keeps_the_most_recent(monkeypatch):
    """The cache logic alone (capture itself needs a GPU: see the CUDA tests): here every capture 'fails', so
    the runner records the signature as eager, which is enough to count captures and evictions."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    captured = []
    monkeypatch.setattr(fast_sampler.GraphRunner, "_capture",
                        lambda self, call, inputs: captured.append(inputs["k"]) or fast_sampler._EAGER)
    runner = fast_sampler.GraphRunner(torch.device("cpu"))
    calls = []

    def use(key, first_use=False):
        return runner(key, lambda x: calls.append(key) or (x["k"], None), {"k": torch.tensor(key)}, first_use)

    use(0)
    assert captured == [] and calls == [0]  # a one-off signature is never captured
    use(0)
    assert captured == [0]
    use(1, first_use=True)
    assert captured == [0, 1]
    for key in range(2, 2 + fast_sampler.GraphRunner.MAX_GRAPHS):
        use(key), use(key)
    assert len(runner.graphs) == fast_sampler.GraphRunner.MAX_GRAPHS and 0 not in runner.graphs
    assert calls.count(0) == 2  # every call still ran (eagerly, here)
    for key in range(100, 100 + 3 * fast_sampler.GraphRunner.MAX_COUNTED):  # one-off signatures, e.g. batch sizes
        use(key)
    assert len(runner.uses) == fast_sampler.GraphRunner.MAX_COUNTED


@pytest.mark.parametrize("mode", ["jacobi", "off"])
@pytest.mark.parametrize("run", ["eager", "traced_parallel"])
@pytest.mark.parametrize("reader", ["latent", "image"])
def test_resnet_encoder_and_batch_one(mode, run, reader):
    """The `small` default encoder; in parallel Jacobi its ResNet and the VAE run side by side. With the
    "image" next-observation reader the worker also decodes each estimate and reads it with the ResNet."""
    policy = _policy("dap", obs_encoder="resnet", next_obs_reader=reader)
    setting = "off" if run == "eager" else "on"
    fast_sampler.set_options(policy, trace=setting, parallel=setting)
    obs = _obs(1, seed=2)
    a_ref, z_ref, _ = _reference(policy, obs, mode, seed=1)
    a, z, _ = _fast(policy, obs, mode, seed=1)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=ATOL)
    if mode == "off":
        assert z is None
    else:
        torch.testing.assert_close(z, z_ref, rtol=0, atol=ATOL)


def test_predict_chunk_uses_the_fast_sampler_with_the_global_seed():
    """predict_chunk without a generator draws the reference's noise from the global RNG, in the same order."""
    policy = _policy("dap")
    obs = _obs(2)
    for mode in COUPLING_MODES:
        torch.manual_seed(11)
        pred = policy.predict_chunk(obs, mode=mode, return_next=True)
        a_ref, z_ref, _ = _reference(policy, obs, mode, seed=11)  # a generator seeded alike: the same draws
        expected = policy.action_normalizer.unnormalize(a_ref).numpy()
        np.testing.assert_allclose(pred.actions, expected, rtol=0, atol=1e-5)
        if mode == "off":
            assert pred.next_frames is None
        else:
            np.testing.assert_array_equal(pred.next_frames, policy.decode_latents(z_ref).numpy())


def test_the_last_jacobi_dynamics_call_runs_only_when_its_output_is_used(monkeypatch):
    policy = _policy("dap")
    fast_sampler.set_options(policy, trace="off", parallel="off")
    calls = []
    original = policy.dynamics.forward_prepared
    monkeypatch.setattr(policy.dynamics, "forward_prepared", lambda *a, **k: calls.append(1) or original(*a, **k))
    for mode in ("jacobi", "gauss_seidel"):
        calls.clear()
        policy.predict_chunk(_obs(1), mode=mode)  # closed loop: actions only
        assert len(calls) == STEPS - 1
        calls.clear()
        policy.predict_chunk(_obs(1), mode=mode, return_next=True)
        assert len(calls) == STEPS
    calls.clear()
    policy.predict_chunk(_obs(1), mode="off")
    assert calls == []


@pytest.mark.parametrize("encoder", ["resnet", "vae"])
def test_one_step_jacobi_and_gauss_seidel_prepare_no_dynamics_and_match_the_reference(monkeypatch, encoder):
    """At K = 1 those modes' only dynamics call is the skipped last one: no dynamics preparation and, with a
    ResNet encoder, no VAE pass; the actions are still the reference's (its noise drawn in the same order)."""
    policy = _policy("dap", obs_encoder=encoder)
    fast_sampler.set_options(policy, trace="off", parallel="on")
    prepared, encoded = [], []
    original_prepare, original_encode = policy.dynamics.prepare_inference, policy.encode_latents
    monkeypatch.setattr(policy.dynamics, "prepare_inference",
                        lambda *a, **k: prepared.append(1) or original_prepare(*a, **k))
    monkeypatch.setattr(policy, "encode_latents", lambda *a, **k: encoded.append(1) or original_encode(*a, **k))
    obs = _obs(1, seed=3)
    for mode in ("jacobi", "gauss_seidel"):
        a_ref, _, _ = _reference(policy, obs, mode, seed=4, steps=1)
        prepared.clear(), encoded.clear()
        a, z, _ = _fast(policy, obs, mode, seed=4, steps=1, return_next=False, return_trace=False)
        torch.testing.assert_close(a, a_ref, rtol=0, atol=ATOL)
        assert z is None and prepared == []
        assert encoded == ([] if encoder == "resnet" else [1])  # the "vae" encoder makes the policy's tokens
        _, z_ref, trace_ref = _reference(policy, obs, mode, seed=4, steps=1)
        prepared.clear(), encoded.clear()
        a, z, trace = _fast(policy, obs, mode, seed=4, steps=1, return_next=True, return_trace=True)
        assert prepared == [1] and encoded == [1]  # the predicted frame / the trace need the one dynamics call
        torch.testing.assert_close(z, z_ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(trace["a_hat"], trace_ref["a_hat"], rtol=0, atol=ATOL)
        prepared.clear()
        _fast(policy, obs, mode, seed=4, steps=1, return_next=False, return_trace=True)
        assert prepared == [1]  # a trace alone also needs it


def test_sample_without_a_dynamics_model_only_where_none_is_called():
    """`sample` needs the dynamics step only where it will call it; an unknown mode is named as such."""
    policy = _policy("fm", obs_encoder="resnet")
    batch = policy.validate_obs(_obs(1))
    with torch.inference_mode():
        step = fast_sampler.PolicyStep(policy.policy_net, policy.observation_tokens(batch, augment=False),
                                       torch.tensor(fast_sampler.time_grid(2)))
        a0 = torch.randn(1, policy.config.horizon, SPEC.action_dim)
        for mode in ("jacobi", "gauss_seidel"):
            with pytest.raises(ValueError, match="needs a dynamics model"):
                fast_sampler.sample(step, None, None, a0, 2, mode, need_latents=False)
        with pytest.raises(ValueError, match="needs a dynamics model"):
            fast_sampler.sample(step, None, None, a0, 1, "predict_then_act", need_latents=False)
        with pytest.raises(ValueError, match="unknown coupling mode 'sideways'"):
            fast_sampler.sample(step, None, None, a0, 2, "sideways", need_latents=False)
        for mode in ("jacobi", "gauss_seidel"):  # K = 1: the only dynamics call is the skipped last one
            a, z = fast_sampler.sample(step, None, None, a0, 1, mode, need_latents=False)
            assert z is None and torch.equal(a, fast_sampler.sample(step, None, None, a0, 1, "off", False)[0])


def test_parallel_jacobi_prepares_the_dynamics_step_in_the_worker(monkeypatch):
    """With a ResNet encoder the dynamics chain (VAE latents, then the DiT's per-call constants) runs on the
    worker beside the ResNet; sequential Jacobi prepares it inline."""
    import threading

    policy = _policy("dap", obs_encoder="resnet")
    threads = []
    original = policy.dynamics.prepare_inference
    monkeypatch.setattr(policy.dynamics, "prepare_inference",
                        lambda *a, **k: threads.append(threading.current_thread().name) or original(*a, **k))
    for parallel, worker in (("on", True), ("off", False)):
        fast_sampler.set_options(policy, trace="on", parallel=parallel)
        threads.clear()
        obs = _obs(1, seed=5)
        a, _, _ = _fast(policy, obs, "jacobi", seed=2, return_next=False, return_trace=False)
        assert len(threads) == 1 and threads[0].startswith("dap-dynamics") == worker
        a_ref, _, _ = _reference(policy, obs, "jacobi", seed=2)
        torch.testing.assert_close(a, a_ref, rtol=0, atol=ATOL)


def test_traces_follow_weight_updates():
    """Traces freeze the weights in: an in-place update (optimizer step, load_state_dict) must drop them."""
    policy = _policy("dap")
    fast_sampler.set_options(policy, trace="on", parallel="off")
    obs = _obs(1)
    before, _, _ = _fast(policy, obs, "jacobi", seed=3)
    with torch.no_grad():
        for p in policy.policy_net.unet.parameters():
            p.mul_(1.5)
        for p in policy.dynamics.parameters():
            p.mul_(0.5)
    a_ref, _, _ = _reference(policy, obs, "jacobi", seed=3)
    after, _, _ = _fast(policy, obs, "jacobi", seed=3)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, a_ref, rtol=0, atol=ATOL)
    # a write through .data bumps no version: `forget` is the documented way to say the weights changed
    for p in policy.policy_net.unet.parameters():
        p.data.mul_(2.0)
    fast_sampler.forget(policy)
    a_ref, _, _ = _reference(policy, obs, "jacobi", seed=3)
    torch.testing.assert_close(_fast(policy, obs, "jacobi", seed=3)[0], a_ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("encoder", ["resnet", "vae"])
def test_the_observation_encoders_run_traced_and_follow_weight_updates(encoder):
    """The encoders run as frozen traces too (the ResNet's Python overhead is ~1 ms of a chunk), and those
    traces are dropped when the encoder's weights change."""
    policy = _policy("dap", obs_encoder=encoder)
    fast_sampler.set_options(policy, trace="on", parallel="on")
    obs = _obs(3, seed=4)
    before, _, _ = _fast(policy, obs, "jacobi", seed=6)
    traces = fast_sampler._STATES[policy].traces.traces
    expected = {"observation_resnet", "current_latents"} if encoder == "resnet" else {"observation_vae"}
    traced = {key[0] for key, fn in traces.items() if fn is not fast_sampler._EAGER}
    assert expected <= traced  # traced, not fallen back to eager
    encoder_module = policy.policy_net.image_encoders if encoder == "resnet" else policy.vae
    with torch.no_grad():
        for p in encoder_module.parameters():
            p.mul_(1.3)
    a_ref, z_ref, _ = _reference(policy, obs, "jacobi", seed=6)
    a, z, _ = _fast(policy, obs, "jacobi", seed=6)
    assert not torch.allclose(a, before)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=ATOL)
    a1, _, _ = _fast(policy, _obs(1, seed=5), "jacobi", seed=7)  # another batch size: its own traces
    torch.testing.assert_close(a1, _reference(policy, _obs(1, seed=5), "jacobi", seed=7)[0], rtol=0, atol=ATOL)


def test_auto_tracing_starts_at_the_second_call_with_the_same_weights():
    policy = _policy("fm")
    fast_sampler.set_options(policy, trace="auto", parallel="off")
    obs = _obs(1)
    first = policy.predict_chunk(obs, generator=torch.Generator().manual_seed(0)).actions
    state = fast_sampler._STATES[policy]
    assert state.traces.traces == {}
    second = policy.predict_chunk(obs, generator=torch.Generator().manual_seed(0)).actions
    assert state.traces.traces  # traced now
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-5)


def test_options_are_validated():
    with pytest.raises(ValueError, match="trace"):
        fast_sampler.SamplerOptions(trace="sometimes")
    with pytest.raises(ValueError, match="parallel"):
        fast_sampler.SamplerOptions(parallel="yes")
    with pytest.raises(ValueError, match="threads"):
        fast_sampler.SamplerOptions(threads=0)


def test_torch_threads_are_restored_after_sampling():
    """Batch-1 sampling runs each model on one intra-op thread ("auto"), then restores torch's setting."""
    policy = _policy("dap")
    fast_sampler.set_options(policy, trace="on", parallel="on")
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a1, _, _ = _fast(policy, _obs(1), "jacobi", seed=0)
        assert torch.get_num_threads() == 2
        fast_sampler.set_options(policy, threads="torch")
        a2, _, _ = _fast(policy, _obs(1), "jacobi", seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
    torch.testing.assert_close(a1, a2, rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["jacobi", "off"])
@pytest.mark.parametrize("run", ["eager", "traced_parallel"])
def test_gated_next_observation_attention_matches_the_reference(mode, run):
    """With `unet.gated_dynamic_context` the null group stays apart from the observation's in the fast path."""
    policy = _policy("dap", **{"unet.gated_dynamic_context": True})
    assert all(float(b.gate.detach()) != 0 for b in _gates(policy))  # randomised: the gated path is live
    setting = "off" if run == "eager" else "on"
    fast_sampler.set_options(policy, trace=setting, parallel=setting)
    obs = _obs(2, seed=3)
    a_ref, z_ref, _ = _reference(policy, obs, mode, seed=4)
    a, z, _ = _fast(policy, obs, mode, seed=4)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=ATOL)
    if z_ref is not None:
        torch.testing.assert_close(z, z_ref, rtol=0, atol=ATOL)


def _gates(policy) -> list:
    unet = policy.policy_net.unet
    return [lvl.attn for lvl in unet.downs] + [unet.mid_attn] + [lvl.attn for lvl in unet.ups]


def test_concurrent_jacobi_builds_the_policy_context_in_the_dynamics_worker(monkeypatch):
    """Parallel Jacobi: the worker turns each fresh estimate into the next policy step's attention context
    (K - 1 contexts, none after the last estimate), off the policy's thread; sequential runs build them inline."""
    import threading

    policy = _policy("dap")
    threads = []
    original = fast_sampler.PolicyStep.context
    monkeypatch.setattr(fast_sampler.PolicyStep, "context",
                        lambda self, z: threads.append(threading.current_thread().name) or original(self, z))
    for parallel, worker in (("on", True), ("off", False)):
        fast_sampler.set_options(policy, trace="off", parallel=parallel)
        threads.clear()
        _fast(policy, _obs(1), "jacobi", seed=0, return_next=False, return_trace=False)
        assert len(threads) == STEPS - 1
        assert all(name.startswith("dap-dynamics") == worker for name in threads)


@pytest.mark.parametrize("setting", ["off", "on"])
def test_a_sampled_policy_is_freed_when_its_last_reference_goes(setting):
    """The per-policy sampler state lives in a weak dictionary keyed by the policy: nothing in it may lead
    back to the policy, or every model ever sampled (and its traces) would stay in memory."""
    import gc
    import weakref

    policy = _policy("dap", next_obs_reader="image", obs_encoder="resnet")
    fast_sampler.set_options(policy, trace=setting, parallel=setting)
    _fast(policy, _obs(1), "jacobi", seed=0)
    _fast(policy, _obs(1), "jacobi", seed=0)
    alive = weakref.ref(policy)
    del policy
    gc.collect()
    assert alive() is None


def test_a_policy_built_under_inference_mode_samples_like_the_reference():
    """Inference tensors carry no version counter: the sampler then caches nothing across calls (instead of
    failing with torch's cryptic error, or reusing traces of weights it cannot tell apart)."""
    with torch.inference_mode():
        policy = _policy("dap")
    fast_sampler.set_options(policy, trace="on", parallel="on")
    obs = _obs(2)
    a_ref, _, _ = _reference(policy, obs, "jacobi", seed=4)
    for _ in range(2):
        a, _, _ = _fast(policy, obs, "jacobi", seed=4)
        torch.testing.assert_close(a, a_ref, rtol=0, atol=ATOL)


def test_tracing_leaves_the_callers_training_mode():
    policy = _policy("dap").train()
    fast_sampler.set_options(policy, trace="on", parallel="off")
    _fast(policy, _obs(1), "jacobi", seed=0)
    assert policy.training and policy.policy_net.training and policy.dynamics.training


def test_a_failing_policy_call_joins_the_dynamics_worker_and_raises():
    concurrent = fast_sampler.Concurrent(torch.device("cpu"))
    finished = []

    def slow_dynamics():
        import time

        time.sleep(0.2)
        finished.append(True)
        return 1

    def failing_policy():
        raise RuntimeError("policy failed")

    with pytest.raises(RuntimeError, match="policy failed"):
        concurrent.both(failing_policy, slow_dynamics)
    assert finished == [True]  # the worker was waited for: it cannot outlive the call


def test_compiled_steps_never_run_in_two_threads():
    """Dynamo is not thread-safe: a compiled Jacobi call on the CPU runs its two models one after the other."""
    options = fast_sampler.SamplerOptions(trace="compile", parallel="on")
    assert not fast_sampler._parallel(options, torch.device("cpu"), fast_sampler.CompileRunner())
    assert fast_sampler._parallel(options, torch.device("cpu"), fast_sampler.TraceRunner())
