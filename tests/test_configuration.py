"""Configs survive JSON exactly (tuples stay tuples, nested dataclasses rebuilt) and reject unknown keys."""

import json

import pytest

from dapolicy.configuration import from_dict, to_dict
from dapolicy.policies import SIZES, get_method, make_config, method_names


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("size", SIZES)
def test_named_configs_round_trip_through_json(method, size):
    entry = get_method(method)
    cfg = entry.config(size)
    back = from_dict(entry.config_class, json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg


def test_unknown_key_is_named():
    data = to_dict(make_config("dap", "tiny"))
    data["unet"]["down_dimz"] = [1, 2]
    with pytest.raises(ValueError, match="down_dimz"):
        from_dict(get_method("dap").config_class, data)


def test_fm_is_its_own_method_without_dynamics_fields():
    fm = make_config("fm", "tiny")
    assert not hasattr(fm, "dynamics") and not hasattr(fm, "next_obs_mix")
    assert set(vars(fm.training)) == {"vae", "policy"}


def test_invalid_values_raise():
    with pytest.raises(ValueError, match="coupling"):
        make_config("dap", "tiny", ["coupling=sideways"])
    with pytest.raises(ValueError, match="n_action_steps"):
        make_config("dap", "tiny", ["n_action_steps=32"])
