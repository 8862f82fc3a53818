"""Every command's bad inputs, driven in-process through `dapolicy.cli.main`: a non-zero exit code, one line on
stderr naming the problem and what to do, and never a traceback. Also the shared flag vocabulary (`--device`,
`--threads`, `--quiet`, `--seed`, `--out`) and a help text on every argument of every command.

The artefacts are tiny (a square-task store, 2-step FM runs made here); no Meta-World simulator is started.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SQUARE_SPEC, make_square_store

from dapolicy.cli import COMMANDS, build_parser, main
from dapolicy.spec import EnvSpec

EVAL_COMMANDS = ("eval", "diagnose", "robustness", "serve")


# ----------------------------------------------------------------------------------------------- artefacts
@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store, a finished run, a run stopped in its last stage and one stopped before any stage finished."""
    from dapolicy.train import train

    root = tmp_path_factory.mktemp("cli_errors")
    data = make_square_store(root / "data")
    kwargs: dict[str, Any] = dict(method="fm", config="tiny", steps=2, progress=False, threads=1)
    out = {"root": root, "data": Path(data), "run": train(data, root / "run", **kwargs),
           "stopped": train(data, root / "stopped", stop_after=3, **kwargs),  # vae done, policy at step 1 of 2
           "empty": train(data, root / "empty", stop_after=1, **kwargs)}  # no stage finished: no model/
    return out


def copy(art: dict[str, Path], name: str, tmp_path: Path) -> Path:
    """A private copy of a run folder that the test may damage."""
    return Path(shutil.copytree(art[name], tmp_path / name))


def _interrupted(*args: Any, **kwargs: Any) -> None:
    """Stands in for a command's work: the user presses Ctrl-C."""
    raise KeyboardInterrupt


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str, code: int = 2) -> str:
    """Run `dap ARGV`; it must exit with `code` and print exactly one error line holding every word (no traceback).
    Returns that line."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line or "interrupted" in line]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert argv[0] in lines[0]  # the command's name: `dap eval: error: ...`
    return lines[0]


@pytest.fixture()
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----------------------------------------------------------------------------------------------- flags
def test_every_argument_of_every_command_has_help() -> None:
    parser = build_parser(every=True)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    missing = [f"{name} {action.dest}" for name, p in sub.choices.items() for action in p._actions
               if not action.help]
    missing += [a.dest for a in parser._actions if not a.help]
    assert not missing, missing


def _defaults(command: str) -> dict[str, Any]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.default for a in sub.choices[command]._actions}


def test_one_flag_vocabulary() -> None:
    for command in ("train", "eval", "diagnose", "robustness", "serve", "bench", "benchmark", "quickstart"):
        assert _defaults(command)["device"] == "auto", command
    for command in EVAL_COMMANDS:
        assert _defaults(command)["threads"] == 1, command  # one thread: OpenMP stalls on a shared machine
    assert _defaults("train")["threads"] is None  # train keeps its auto rule
    for command in ("train", "eval", "diagnose", "robustness", "collect", "quickstart", "benchmark", "import"):
        assert _defaults(command)["quiet"] is False, command
    for command in ("eval", "robustness", "benchmark", "quickstart"):  # episodes side by side in processes
        assert "workers" in _defaults(command), command
    for command in ("train", "eval", "diagnose", "robustness", "collect", "quickstart", "render-ood", "serve"):
        assert "seed" in _defaults(command), command
    for command in ("train", "eval", "diagnose", "robustness", "collect", "quickstart", "render-ood", "bench",
                    "import", "export", "serve"):
        assert "out" in _defaults(command) or "json" in _defaults(command), command


def test_old_spellings_still_work(art: dict[str, Path], tmp_path: Path) -> None:
    parser = build_parser("train")
    args = parser.parse_args(["train", "--data", "d", "--out", "o", "--no-progress"])
    assert args.quiet
    args = build_parser("render-ood").parse_args(["render-ood", "pusht", "--out", "x.png", "--seed-start", "3"])
    assert args.seed == 3
    args = build_parser("bench").parse_args(["bench", "latency", "--json", "x.json"])
    assert args.json == "x.json"


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, ["info", "--config", "bogus"], "--config", "invalid choice", "bogus", "--help")
    fails(capsys, ["info", "--method", "bogus"], "--method", "bogus")
    fails(capsys, ["eval"], "required", "run")
    assert main(["eval", "--help"]) == 0
    assert "--threads" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- eval
def test_eval_bad_inputs(art: dict[str, Path], capsys: pytest.CaptureFixture[str], no_gpu: None) -> None:
    run = art["run"]
    fails(capsys, ["eval", art["root"] / "missing"], "missing", "does not exist", "dap train --out")
    fails(capsys, ["eval", run, "--env", "bogus"], "unknown env 'bogus'", "metaworld/")
    fails(capsys, ["eval", run, "--episodes", "0"], "--episodes", ">= 1")
    fails(capsys, ["eval", run, "--threads", "0"], "--threads", ">= 1")
    fails(capsys, ["eval", run, "--device", "cuda"], "--device cuda", "no CUDA device", "cpu")
    fails(capsys, ["eval", run, "--device", "gpu0"], "--device 'gpu0'", "not a device")
    fails(capsys, ["eval", run, "--mode", "newton"], "no generation mode 'newton'")
    fails(capsys, ["eval", run, "--ood", "fog"], "--ood", "fog")


def test_eval_of_a_model_for_another_task(art: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from dapolicy.policies import make_policy

    spec = EnvSpec("reacher", ("top",), 32, action_dim=3, proprio_dim=2, max_steps=10)
    make_policy("fm", spec, size="tiny").save_pretrained(tmp_path / "reacher")
    fails(capsys, ["eval", tmp_path / "reacher", "--env", "pusht", "--quiet"], "action_dim 2", "expects 3",
          "trained on 'reacher'")
    # same shapes (PushT is 32 px here, one camera 'top', 2-D action and proprio), another task: a note, then it runs
    assert SQUARE_SPEC.cameras == ("top",) and SQUARE_SPEC.action_dim == SQUARE_SPEC.proprio_dim == 2
    code = main(["eval", str(art["run"]), "--env", "pusht", "--episodes", "1", "--max-steps", "2", "--videos", "0",
                 "--quiet", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    notes = [line for line in err.splitlines() if "note" in line]
    assert len(notes) == 1 and "trained on 'square'" in notes[0] and "'pusht'" in notes[0]


def test_eval_of_a_corrupt_model_folder(art: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = copy(art, "run", tmp_path)
    weights = run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    fails(capsys, ["eval", run], "model.safetensors", "corrupt or truncated")
    (run / "model" / "config.json").write_text("{not json")
    fails(capsys, ["eval", run], "model/config.json", "corrupt")
    (run / "config.json").write_text("")
    fails(capsys, ["eval", run], f"{run}/config.json", "corrupt", "model folder")


def test_commands_refuse_an_unfinished_run(art: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    stopped = art["stopped"]
    for argv in (["eval", stopped], ["diagnose", stopped], ["bench", stopped, "--reps", "1"],
                 ["bench", "modes", stopped], ["serve", stopped, "--check"], ["serve", stopped],
                 ["robustness", art["run"], stopped, "--ood", "light", "--out", stopped.parent / "r.png"]):
        fails(capsys, argv, "unfinished", "policy never finished", "finished: vae",
              f"dap train --out {stopped} --resume")
    assert not (stopped.parent / "r.png").exists()  # nothing ran for the finished run either
    fails(capsys, ["eval", art["empty"]], "no stage has finished", f"dap train --out {art['empty']} --resume")
    # the model folder itself is what a user passes to use a stopped run as it is
    from dapolicy.policies.registry import check_run_finished

    check_run_finished(stopped / "model")


# ----------------------------------------------------------------------------------------------- diagnose
def test_diagnose_bad_inputs(art: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dapolicy.policies import make_policy

    fails(capsys, ["diagnose", art["root"] / "missing"], "does not exist")
    moved = copy(art, "run", tmp_path)
    config = json.loads((moved / "config.json").read_text())
    config["data"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    fails(capsys, ["diagnose", moved, "--quiet"], str(tmp_path / "gone"), "--data", "not at")
    (moved / "config.json").write_text("{\"data\": ")
    fails(capsys, ["diagnose", moved, "--quiet"], f"{moved}/config.json", "corrupt")
    make_policy("fm", SQUARE_SPEC, size="tiny").save_pretrained(tmp_path / "bare")
    fails(capsys, ["diagnose", tmp_path / "bare"], "cannot tell which data", "--data")
    fails(capsys, ["diagnose", tmp_path / "bare", "--data", tmp_path / "nodata"], "no episode store", "nodata")
    fails(capsys, ["diagnose", art["run"], "--windows", "0"], "--windows", ">= 1")


# ----------------------------------------------------------------------------------------------- bench, serve
def test_bench_and_serve_bad_inputs(art: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    missing = art["root"] / "missing"
    fails(capsys, ["bench", missing], "does not exist")
    fails(capsys, ["bench", "modes", missing], "does not exist")
    fails(capsys, ["bench", "modes", art["run"], "--reps", "0"], "--reps", ">= 1")
    fails(capsys, ["bench", "modes"], "needs a run folder")
    fails(capsys, ["bench", "speed", art["run"]], "unknown bench mode 'speed'")
    fails(capsys, ["bench", "latency", "--batch", "0"], "--batch", "positive")
    fails(capsys, ["serve", missing], "does not exist")
    fails(capsys, ["serve", missing, "--check"], "does not exist")
    fails(capsys, ["serve", art["run"], "--check", "bogus"], "unknown env 'bogus'")


# ----------------------------------------------------------------------------------------------- info, render-ood
def test_render_ood_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid.png"
    fails(capsys, ["render-ood", "bogus", "--out", out], "unknown env 'bogus'")
    fails(capsys, ["render-ood", "pusht", "--cameras", "front", "--out", out], "unknown camera", "front", "top")
    fails(capsys, ["render-ood", "pusht", "--ood", "fog", "--out", out], "--ood", "fog")
    fails(capsys, ["render-ood", "pusht", "--seeds", "0", "--out", out], "--seeds", ">= 1")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- quickstart
class _NoEnv:
    """What `run_quickstart`'s early env check builds, without a simulator."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_quickstart_bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str], no_gpu: None) -> None:
    import dapolicy.collect
    import dapolicy.envs.base

    out = tmp_path / "qs"
    fails(capsys, ["quickstart", "--out", out, "--config", "bogus"], "--config", "bogus")
    fails(capsys, ["quickstart", "--out", out, "--method", "bogus"], "--method", "bogus")
    fails(capsys, ["quickstart", "--out", out, "--env", "bogus"], "unknown env 'bogus'")
    fails(capsys, ["quickstart", "--out", out, "--steps", "vae=1,bogus=2"], "--steps", "unknown stage 'bogus'")
    fails(capsys, ["quickstart", "--out", out, "--device", "cuda"], "--device cuda", "no CUDA device")
    assert not out.exists()  # checked before anything was collected or written

    monkeypatch.setattr(dapolicy.envs.base, "make_env", _NoEnv)
    monkeypatch.setattr(dapolicy.collect, "collect", _interrupted)
    fails(capsys, ["quickstart", "--out", out, "--quiet"], "interrupted", f"dap quickstart --out {out}", code=130)
    fails(capsys, ["quickstart", "--out", out, "--seed", "1"], "other settings", "seed: 0 -> 1", "--overwrite")
    (out / "settings.json").write_text("{")
    fails(capsys, ["quickstart", "--out", out], "settings.json", "corrupt", "--overwrite")


# ----------------------------------------------------------------------------------------------- train
def test_train_bad_inputs(art: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          no_gpu: None) -> None:
    data, run = art["data"], art["run"]
    base = ["train", "--data", data, "--config", "tiny", "--quiet"]
    fails(capsys, ["train", "--out", tmp_path / "new"], "--data is required for a new run")
    fails(capsys, ["train", "--out", tmp_path / "new", "--resume"], "holds no run to resume", "--data")
    fails(capsys, [*base, "--out", tmp_path / "x", "--device", "cuda"], "no CUDA device")
    fails(capsys, ["train", "--data", tmp_path / "nodata", "--out", tmp_path / "x"], "no episode store", "nodata")
    fails(capsys, [*base, "--out", tmp_path / "x", "--stage", "bogus"], "unknown stage", "bogus")
    fails(capsys, [*base, "--out", tmp_path / "x", "--steps", "vae=x"], "--steps")
    fails(capsys, [*base, "--out", run], "already holds a training run", "--resume", "--overwrite")
    fails(capsys, [*base, "--out", run, "--method", "dap", "--resume"], "method='fm'", "--overwrite")
    fails(capsys, [*base, "--out", tmp_path / "x", "--grad-accum", "0"], "--grad-accum", ">= 1")
    corrupt = copy(art, "run", tmp_path)
    (corrupt / "config.json").write_text("{")
    fails(capsys, ["train", "--data", data, "--out", corrupt, "--resume"], f"{corrupt}/config.json", "corrupt",
          "--overwrite")


def test_train_corrupt_checkpoint(art: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stopped = copy(art, "stopped", tmp_path)
    last = stopped / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    fails(capsys, ["train", "--out", stopped, "--resume", "--quiet"], str(last), "corrupt or truncated",
          "--overwrite", "delete it")
    last.unlink()  # what the message suggests: the stage trains again from its start
    assert main(["train", "--out", str(stopped), "--resume", "--quiet"]) == 0


def test_train_resume_without_data_and_stored_flags_turned_off(art: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from dapolicy.train import train

    run = train(art["data"], tmp_path / "flags", method="fm", config="tiny", steps=2, progress=False, threads=1,
                use_best=True, amp=True, stop_after=3)
    assert main(["train", "--out", str(run), "--resume", "--no-use-best", "--no-amp", "--quiet"]) == 0
    stored = json.loads((run / "config.json").read_text())
    assert stored["data"] == str(art["data"].resolve())
    assert stored["train"]["use_best"] is False and stored["train"]["amp"] is False
    assert json.loads((run / "state.json").read_text())["stages_done"] == stored["stages"]
    capsys.readouterr()


def test_train_missing_logger_package(art: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    out = tmp_path / "tb"
    argv = ["train", "--data", art["data"], "--out", out, "--method", "fm", "--config", "tiny", "--steps", "1",
            "--quiet"]
    fails(capsys, [*argv, "--logger", "tensorboard"], "--logger tensorboard", "pip install tensorboard",
          "--logger none")
    assert not out.exists()  # nothing stored: the retry without --logger starts clean
    assert main([str(a) for a in argv]) == 0
    # a stored run whose logger's package is gone: --logger none on resume continues it
    config = json.loads((out / "config.json").read_text())
    config["train"]["logger"] = "tensorboard"
    (out / "config.json").write_text(json.dumps(config))
    (out / "state.json").unlink()
    fails(capsys, ["train", "--out", out, "--resume", "--quiet"], "was trained with --logger tensorboard",
          "--logger none")
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--logger", "none"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["logger"] == "none"


def test_ctrl_c_gives_the_resume_command(art: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import dapolicy.evaluate
    import dapolicy.train

    monkeypatch.setattr(dapolicy.train, "train", _interrupted)
    fails(capsys, ["train", "--data", art["data"], "--out", tmp_path / "r"], "interrupted",
          f"dap train --out {tmp_path / 'r'} --resume", code=130)
    monkeypatch.setattr(dapolicy.evaluate, "evaluate", _interrupted)
    fails(capsys, ["eval", art["run"]], "interrupted", "rerun the same command", code=130)


def test_ctrl_c_promises_no_resume_where_nothing_is_kept(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import dapolicy.bench

    monkeypatch.setattr(dapolicy.bench, "run", _interrupted)
    line = fails(capsys, ["bench", "latency", "--config", "tiny"], "interrupted", code=130)
    assert "rerun" not in line and "kept" not in line, line


def test_readme_commands_parse() -> None:
    """Every `dap ...` line of the README's "Using it" section is accepted by the parser as written."""
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0] for line in section.splitlines() if line.startswith("dap ")]
    assert len(lines) >= 10
    for line in lines:
        argv = [a for a in shlex.split(line)[1:] if a != "..."]
        args = build_parser(argv[0]).parse_args(argv)  # a usage error would exit
        assert args.command == argv[0]
