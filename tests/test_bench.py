"""`dap bench` times every coupling mode and reports ratios to the plain policy."""

import torch

from dapolicy.bench import bench_modes
from dapolicy.spec import EnvSpec
from dapolicy.policies import make_policy


def test_bench_reports_every_mode_with_ratio_to_off():
    torch.manual_seed(0)
    spec = EnvSpec(name="t", cameras=("a",), image_size=32, action_dim=2, proprio_dim=2, max_steps=5)
    result = bench_modes(make_policy("dap", spec, size="tiny"), reps=2)
    assert set(result) == {"jacobi", "gauss_seidel", "predict_then_act", "off"}
    assert result["off"]["ratio_to_off"] == 1.0
    assert all(r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] for r in result.values())
