import pytest

from dapolicy.training.checkpoint import save_checkpoint
from dapolicy.training.rundir import RunDir, RunFolderError


def test_lock_is_exclusive_and_clears_stale_temp_files(tmp_path) -> None:
    run = RunDir(tmp_path / "run")
    save_checkpoint(run.last, {"step": 1})
    stale = run.checkpoints / ".last.pt.abc123.tmp"  # left by a kill during a checkpoint write
    stale.write_bytes(b"half")
    with run.lock():
        assert not stale.exists() and run.last.exists()
        with pytest.raises(RunFolderError, match="another"):
            with run.lock():
                pass
    with run.lock():  # released
        pass
    assert oct(run.last.stat().st_mode & 0o777) != oct(0o600)  # readable like any file the user writes


def test_model_swap_recovery(tmp_path) -> None:
    run = RunDir(tmp_path)
    old = tmp_path / ".model.old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    assert not run.has_model()
    run.recover_model()
    assert run.has_model() and (run.model / "config.json").exists()
