"""What both flows need to run stages: the project lock, the error channel a
stage writes its one-line error to (``SAAP_STAGE_ERROR_FILE``, see
stages/common.py), and which failures are worth a retry."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from saap.errors import SaapError, SourceError

LOCK_NAME = "saap-compress.lock"


class ConcurrentRunError(SaapError):
    """Another compress run holds the project lock."""


class StageFailedError(SaapError):
    """A DVC stage exited with an error; the message is the stage's own."""


@contextlib.contextmanager
def project_lock(project: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive lock on the project; wait up to ``timeout_s`` for it."""
    lock_dir = project / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True, exist_ok=True)
    handle = (lock_dir / LOCK_NAME).open("a+")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConcurrentRunError(
                        f"another compress run holds {lock_dir / LOCK_NAME} after "
                        f"{timeout_s:.0f} s of waiting; let it finish (or raise "
                        "lock_timeout_s) and run again"
                    ) from None
                time.sleep(1.0)
        yield
    finally:
        handle.close()


def is_transient(exc: BaseException) -> bool:
    """DVC lock contention and download/network errors are worth a retry."""
    from dvc.exceptions import LockError

    text = str(exc).lower()
    if isinstance(exc, LockError):
        return True
    return isinstance(exc, SourceError | ConnectionError | TimeoutError) and any(
        word in text for word in ("timed out", "connection", "temporarily", "network")
    )


def retry_transient(_task, _task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the state's own exception
        return is_transient(exc)
    return False


@contextlib.contextmanager
def stage_error_file(project: Path, tag: str) -> Iterator[Path]:
    """A per-process file a failing stage writes its error to; removed after."""
    path = project / ".dvc" / "tmp" / f"{tag}-{os.getpid()}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
