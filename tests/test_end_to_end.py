"""The user's workflow end to end on a real simulator (Meta-World, two cameras), at toy size:
collect -> train -> eval -> diagnose."""

import json

import numpy as np

from dapolicy.collect import collect
from dapolicy.diagnose import diagnose
from dapolicy.evaluate import evaluate
from dapolicy.policies import DAPPolicy
from dapolicy.train import train


def test_collect_train_eval_diagnose_on_metaworld(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    summary = collect("metaworld/button-press-v3", data, expert_episodes=3, random_episodes=2, seed=0,
                      image_size=32, progress=False, max_steps=100, random_length=20)
    assert summary["episodes"] == 5

    train(data, run, method="dap", config="tiny", steps="vae=6,dynamics=6,policy=6", seed=0, threads=1,
          progress=False)
    state = json.loads((run / "state.json").read_text())
    assert set(state["stages_done"]) >= {"vae", "dynamics", "policy"}
    policy = DAPPolicy.from_pretrained(run / "model")
    assert policy.spec.name == "metaworld/button-press-v3" and policy.spec.image_size == 32

    result = evaluate(run, episodes=2, ood="light", max_steps=12, videos=1, progress=False)
    saved = json.loads((run / "eval" / "light.json").read_text())
    assert saved["n_episodes"] == 2 and len(saved["episodes"]) == 2
    low, high = saved["ci95"]
    assert 0.0 <= low <= saved["success_rate"] <= high <= 1.0
    assert saved["latency_ms"]["p50"] > 0
    assert result["success_rate"] == saved["success_rate"]
    assert list((run / "eval" / "videos").iterdir())

    diag = diagnose(run, windows=4, progress=False)
    assert (run / "diagnose" / "diagnose.json").is_file() and (run / "diagnose" / "strip.png").is_file()
    curves = json.dumps(diag)
    assert "psnr" in curves.lower() and not np.isnan(np.array(diag["tau"], dtype=float)).any()
