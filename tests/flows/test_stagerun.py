"""Stage runner details that need no model: which errors are retried, and the
repair of DVC's lock table after a DVC process was killed mid-write."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest

from flows.stagerun import StageBusyError, is_transient, repair_rwlock, repro
from saap.errors import SourceError


def test_transient_errors_are_the_retried_ones():
    from dvc.lock import LockError

    assert is_transient(LockError("Unable to acquire lock"))
    assert is_transient(StageBusyError("stage busy"))
    assert is_transient(SourceError("connection reset while downloading"))
    assert not is_transient(SourceError("sha256 mismatch for x.whl"))
    assert not is_transient(ValueError("ratio 0.95 cannot be reached"))


@pytest.fixture
def dvc_project(tmp_path):
    """A real DVC repository (no git) with one stage that writes a file."""
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"],
        cwd=tmp_path,
        check=True,
    )
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  hello:\n    cmd: echo hi > out.txt\n    outs:\n    - out.txt\n"
    )
    return tmp_path


def dvc_status(project):
    return subprocess.run(
        [sys.executable, "-m", "dvc", "status"],
        cwd=project,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("left", ["", '{"read": {}, "wri'])
def test_a_half_written_lock_table_is_removed_and_dvc_works_again(dvc_project, left):
    table = dvc_project / ".dvc" / "tmp" / "rwlock"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(left)
    broken = dvc_status(dvc_project)
    assert broken.returncode != 0 and "RWLock-file" in broken.stderr
    assert repair_rwlock(dvc_project) is True
    assert not table.exists()
    assert dvc_status(dvc_project).returncode == 0
    assert repro(dvc_project, "hello") is True
    assert (dvc_project / "out.txt").read_text().strip() == "hi"


def test_a_readable_lock_table_is_left_alone(dvc_project):
    table = dvc_project / ".dvc" / "tmp" / "rwlock"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text('{"read": {}, "write": {}}')
    assert repair_rwlock(dvc_project) is False
    assert table.read_text() == '{"read": {}, "write": {}}'
    with contextlib.suppress(FileNotFoundError):
        (dvc_project / ".dvc" / "tmp" / "rwlock").unlink()
    assert repair_rwlock(dvc_project) is False
