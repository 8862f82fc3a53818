"""PolicyNet initialisation: `paired_init` gives FM and DAP networks of one seed the same body."""

import pytest
import torch

from dapolicy.policies import make_config, make_policy
from dapolicy.policies.policy_net import drawn_from
from dapolicy.spec import EnvSpec
from dapolicy.training.checkpoint import seed_everything

SPEC = EnvSpec(name="test", cameras=("a", "b"), image_size=32, action_dim=3, proprio_dim=2, max_steps=10,
               action_low=(-1, -1, -1), action_high=(1, 1, 1))
NEXT_OBS_PARTS = ("next_tokenizer", "null_next")


def _net(method: str, seed: int, *overrides: str):
    seed_everything(seed)
    return make_policy(method, SPEC, make_config(method, "tiny", ["obs_encoder=resnet", *overrides])).policy_net


def _shared(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, bool]:
    """For every parameter both networks have: are the values equal?"""
    sa, sb = a.state_dict(), b.state_dict()
    return {k: torch.equal(sa[k], sb[k]) for k in sa.keys() & sb.keys()}


def test_paired_init_gives_fm_and_dap_of_one_seed_the_same_body():
    fm, dap = _net("fm", 0, "paired_init=true"), _net("dap", 0, "paired_init=true")
    same = _shared(fm, dap)
    assert len(same) > 20 and all(same.values()), [k for k, v in same.items() if not v]
    assert any(k.startswith(NEXT_OBS_PARTS) for k in dap.state_dict())  # DAP has its own parts on top
    # registers come from their own stream too: adding them leaves the body as it was
    with_registers = _shared(fm, _net("fm", 0, "paired_init=true", "register_tokens=4"))
    assert all(with_registers.values())


def test_without_paired_init_dap_draws_its_policy_after_its_vae():
    """The default (the benchmark's recorded runs): FM and DAP of one seed start from different weights."""
    same = _shared(_net("fm", 0), _net("dap", 0))
    assert not all(same.values())


def test_paired_init_depends_on_the_seed_and_leaves_the_global_generator_alone():
    a, b = _net("fm", 0, "paired_init=true"), _net("fm", 1, "paired_init=true")
    assert not all(_shared(a, b).values())
    seed_everything(5)
    expected = torch.rand(3)
    seed_everything(5)
    make_policy("fm", SPEC, make_config("fm", "tiny", ["obs_encoder=resnet", "paired_init=true"]))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("seed", [None, 11])
def test_drawn_from(seed):
    torch.manual_seed(2)
    with drawn_from(seed):
        inside = torch.rand(2)
    after = torch.rand(2)
    torch.manual_seed(2)
    first = torch.rand(2)
    if seed is None:  # the global generator as it stands
        assert torch.equal(inside, first)
    else:  # its own stream, and the global one untouched
        assert torch.equal(inside, torch.rand(2, generator=torch.Generator().manual_seed(seed)))
        assert torch.equal(after, first)


def test_training_runs_of_one_seed_start_from_the_same_body(square_store, tmp_path):
    """Through `train` (which seeds, then builds the policy): with 0 steps the saved weights are the initial ones."""
    from dapolicy.policies import load_pretrained
    from dapolicy.train import train

    nets = {}
    for method in ("fm", "dap"):
        run = train(square_store, tmp_path / method, method=method, config="tiny", steps=0, seed=3, threads=1,
                    progress=False, device="cpu",
                    overrides=["obs_encoder=resnet", "resnet.width=8", "paired_init=true"])
        nets[method] = load_pretrained(run).policy_net
    same = _shared(nets["fm"], nets["dap"])
    assert len(same) > 20 and all(same.values()), [k for k, v in same.items() if not v]


def test_a_gated_paired_dap_network_starts_as_fms_whatever_its_prediction():
    """`unet.gated_dynamic_context` + `paired_init` (the cpu suite's `dap-resnet-paired-gated`): the gates start at
    0 and draw no random numbers, so DAP's network computes FM's velocity exactly until training opens them."""
    fm = _net("fm", 0, "paired_init=true")
    dap = _net("dap", 0, "paired_init=true", "unet.gated_dynamic_context=true")
    assert all(_shared(fm, dap).values())
    gates = [p for n, p in dap.named_parameters() if n.endswith(".gate")]
    assert gates and all(not g.detach().any() for g in gates)
    torch.manual_seed(1)
    x, tau = torch.randn(2, 16, SPEC.action_dim), torch.rand(2)
    static = torch.randn(2, 5, fm.unet.context_dim)
    dynamic = torch.randn(2, 7, fm.unet.context_dim) * 3
    with torch.no_grad():
        expected = fm.unet(x, tau, static_tokens=static)
        assert torch.equal(dap.unet(x, tau, static_tokens=static, dynamic_tokens=dynamic), expected)
        gates[0].fill_(0.5)  # an opened gate lets the prediction in
        assert not torch.allclose(dap.unet(x, tau, static_tokens=static, dynamic_tokens=dynamic), expected)


def test_an_open_gated_paired_dap_network_shares_fms_weights_and_starts_with_its_gates_open():
    """`unet.dynamic_gate_init` (the cpu suite's `dap-resnet-paired-gate-open`): the same paired weights as FM's
    network, every gate at the given value, so the prediction is used from the first training step."""
    fm = _net("fm", 0, "paired_init=true")
    dap = _net("dap", 0, "paired_init=true", "unet.gated_dynamic_context=true", "unet.dynamic_gate_init=2.0")
    assert all(_shared(fm, dap).values())
    gates = [p.detach() for n, p in dap.named_parameters() if n.endswith(".gate")]
    assert gates and all(torch.equal(g, torch.full((1,), 2.0)) for g in gates)


def test_fm_refuses_gates_it_would_never_use():
    """FM reads no prediction: gated attention there would only add parameters that never get a gradient."""
    with pytest.raises(ValueError, match="reads no prediction"):
        _net("fm", 0, "unet.gated_dynamic_context=true")
