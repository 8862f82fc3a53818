"""Configs survive JSON exactly (tuples stay tuples, nested dataclasses rebuilt) and reject unknown keys."""

import json

import pytest

from dapolicy.configuration import from_dict, to_dict
from dapolicy.policies.config import DAPConfig, get_config


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_named_configs_round_trip_through_json(name):
    cfg = get_config(name)
    back = from_dict(DAPConfig, json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg
    assert isinstance(back.unet.down_dims, tuple)


def test_unknown_key_is_named():
    data = to_dict(get_config("tiny"))
    data["unet"]["down_dimz"] = [1, 2]
    with pytest.raises(ValueError, match="down_dimz"):
        from_dict(DAPConfig, data)


def test_fm_method_turns_off_the_prediction():
    cfg = get_config("tiny", method="fm")
    assert cfg.coupling == "off" and cfg.next_obs_mix.null == 1.0 and not cfg.uses_dynamics


def test_invalid_values_raise():
    with pytest.raises(ValueError, match="coupling"):
        get_config("tiny", coupling="sideways")
    with pytest.raises(ValueError, match="n_action_steps"):
        get_config("tiny", n_action_steps=32)
