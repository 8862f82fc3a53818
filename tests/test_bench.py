"""`dap bench`: modes of a trained model, latency of every method, training throughput (figures, not timings).

Performance itself is never asserted here: the machine is shared; these tests check what gets reported.
"""

import json

import pytest
import torch

from dapolicy.bench import Case, bench_latency, bench_modes, synthetic_batch, time_interleaved
from dapolicy.cli import main
from dapolicy.policies import make_config, make_policy
from dapolicy.policies.registry import method_names
from dapolicy.spec import EnvSpec


def test_bench_reports_every_mode_with_ratio_to_off():
    torch.manual_seed(0)
    spec = EnvSpec(name="t", cameras=("a",), image_size=32, action_dim=2, proprio_dim=2, max_steps=5)
    result = bench_modes(make_policy("dap", spec, size="tiny"), reps=2)
    assert set(result) == {"jacobi", "gauss_seidel", "predict_then_act", "off"}
    assert result["off"]["ratio_to_off"] == 1.0
    assert all(r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] for r in result.values())


def test_bench_latency_times_every_method_and_mode():
    report = bench_latency("tiny", batches=[1, 2], steps=[1, 2], reps=1, warmup=1)
    cases = {(r["method"], r["mode"], r["steps"], r["batch"]) for r in report["results"]}
    for b in (1, 2):
        for k in (1, 2):
            assert {("dap", m, k, b) for m in ("jacobi", "gauss_seidel", "predict_then_act", "off")} <= cases
            assert ("fm", "default", k, b) in cases
    assert {r["method"] for r in report["results"]} == set(method_names())
    for r in report["results"]:
        if r["mode"] == "ddpm":  # ancestral diffusion runs its full T steps, whatever the K sweep
            assert r["steps"] == 100
    for k in ("1", "2"):
        entry = report["per_k"][k]
        assert entry["ratio_dap_over_fm"] > 0 and entry["dap_p50_ms"] > 0 and entry["batch"] == 1
        assert set(entry["by_batch"]) == {"1", "2"}
    assert all(r["p90_ms"] >= r["p50_ms"] > 0 and r["n"] == 1 for r in report["results"])


@pytest.mark.parametrize("protocol", ["warm", "cold"])
def test_time_interleaved_protocols(protocol, monkeypatch):
    """Every round runs every case in a shuffled order; "warm" precedes each timed run by an untimed run of
    the same case, "cold" times the run right after whatever case came before; `idle_ms` sleeps right before
    every timed run, outside the timed window."""
    import types

    import dapolicy.bench

    log: list[tuple[str, bool]] = []
    timing = {"on": False}

    def perf_counter() -> float:  # the runs between a case's two clock reads are the timed ones
        timing["on"] = not timing["on"]
        return 0.0

    fake_time = types.SimpleNamespace(perf_counter=perf_counter,
                                      sleep=lambda seconds: log.append((f"sleep {seconds:g}", timing["on"])))
    monkeypatch.setattr(dapolicy.bench, "time", fake_time)
    cases = [Case({"name": n}, lambda n=n: log.append((n, timing["on"]))) for n in "abc"]
    times = time_interleaved(cases, reps=4, warmup=1, protocol=protocol, idle_ms=5)
    assert [len(t) for t in times] == [4, 4, 4]
    runs = log[3:]  # after one warm-up run per case
    per_round = 9 if protocol == "warm" else 6  # (untimed run,) sleep, timed run per case
    assert len(runs) == 4 * per_round
    for r in range(4):
        timed = [name for name, on in runs[r * per_round:(r + 1) * per_round] if on]
        assert sorted(timed) == ["a", "b", "c"]
    for i, (name, on) in enumerate(runs):
        if on:
            assert runs[i - 1] == ("sleep 0.005", False)  # the idle gap, untimed, just before
            if protocol == "warm":
                assert runs[i - 2] == (name, False)  # the same case, untimed, before that
    with pytest.raises(ValueError, match="protocol"):
        time_interleaved(cases, reps=1, protocol="hot")


def test_dap_bench_latency_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "latency.json"
    code = main(["bench", "latency", "--config", "tiny", "--batch", "1", "--steps", "2", "--reps", "1",
                 "--methods", "dap,fm", "--threads", "1", "--reference", "--idle-ms", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "latency" and report["config"] == "tiny" and report["threads"] == [1]
    assert report["protocol"] == "warm" and report["idle_ms"] == 1.0  # warm: a chunk after one of the same case
    assert {"ratio_dap_over_fm", "dap_p50_ms", "fm_p50_ms"} <= set(report["per_k"]["2"])
    assert {r["method"] for r in report["results"]} == {"dap", "fm", "dap-reference", "fm-reference"}
    assert "load_avg_1_5_15" in report["machine"] and "Jacobi DAP over FM" in capsys.readouterr().out
    assert main(["bench", "latency", "--config", "tiny", "--idle-ms", "-1"]) != 0
    assert "--idle-ms must be >= 0" in capsys.readouterr().err


def test_dap_bench_latency_sampler_and_precision_options_are_applied_and_recorded(tmp_path, monkeypatch):
    from dapolicy.policies import fast_sampler

    monkeypatch.setattr(fast_sampler, "_DEFAULT", fast_sampler.SamplerOptions())  # the CLI sets the default
    saved = torch.get_float32_matmul_precision()
    out = tmp_path / "latency.json"
    try:
        code = main(["bench", "latency", "--config", "tiny", "--batch", "1", "--steps", "1", "--reps", "1",
                     "--methods", "fm", "--threads", "1", "--sampler", "trace=on,threads=1",
                     "--matmul-precision", "high", "--out", str(out)])
    finally:
        torch.set_float32_matmul_precision(saved)
    report = json.loads(out.read_text())
    assert code == 0 and report["sampler"] == {"trace": "on", "parallel": "auto", "threads": 1, "cuda_graph": "auto"}
    assert report["matmul_precision"] == "high"


@pytest.mark.parametrize("setting,message", [("trace=maybe", "trace must be"), ("speed=9", "KEY one of"),
                                             ("trace", "KEY=VALUE")])
def test_dap_bench_rejects_bad_sampler_settings(setting, message, capsys):
    assert main(["bench", "latency", "--sampler", setting]) == 2
    assert message in capsys.readouterr().err


def test_dap_bench_train_cli_reports_every_stage(tmp_path):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--config", "tiny", "--reps", "1", "--methods", "dap,fm", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["method"], r["stage"]) for r in report["results"]}
    assert rows == {("dap", "vae"), ("dap", "dynamics"), ("dap", "policy"), ("fm", "vae"), ("fm", "policy")}
    assert all(r["samples_per_s"] > 0 and r["batch_size"] == 8 for r in report["results"])


def test_synthetic_batches_follow_the_stage_layout():
    spec = EnvSpec(name="t", cameras=("a", "b"), image_size=32, action_dim=3, proprio_dim=2, max_steps=5)
    policy = make_policy("dap", spec, size="tiny")
    assert synthetic_batch(policy, "vae", 4)["images"].shape == (4, 2, 32, 32, 3)
    batch = synthetic_batch(policy, "dynamics", 4)
    assert batch["latents"].shape == (4, 2, 2, 4, 4, 4) and batch["next_latents"].shape == (4, 2, 4, 4, 4)
    assert batch["action"].shape == (4, 16, 3) and batch["action_is_pad"].dtype == torch.bool
    policy = make_policy("fm", spec, make_config("fm", "tiny", {"obs_encoder": "resnet"}))
    assert policy.stage_names == ("policy",)
    assert synthetic_batch(policy, "policy", 2)["images"].shape == (2, 2, 2, 32, 32, 3)


def test_dap_bench_run_and_bench_modes_run(tmp_path, capsys):
    torch.manual_seed(0)
    spec = EnvSpec(name="t", cameras=("a",), image_size=32, action_dim=2, proprio_dim=2, max_steps=5)
    make_policy("dap", spec, size="tiny").save_pretrained(tmp_path / "model")
    assert main(["bench", str(tmp_path / "model"), "--reps", "1"]) == 0
    assert main(["bench", "modes", str(tmp_path / "model"), "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("| predict_then_act |") == 2
    assert main(["bench", "modes"]) == 2  # no run: a one-line user error
