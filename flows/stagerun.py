"""What both flows need to run stages: the project lock, the error channel a
stage writes its one-line error to (``SAAP_STAGE_ERROR_FILE``, see
stages/common.py), running a DVC stage (in process: :func:`repro`; as a DVC
experiment in a subprocess: :func:`exp_run`) with that error as the failure's
message, and which failures are worth a retry."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
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


def _failure(error_file: Path, fallback: str) -> str:
    """The stage's own one-line error if it wrote one, else ``fallback``."""
    if error_file.is_file():
        text = error_file.read_text().strip()
        if text:
            return text
    return fallback


def repro(project: Path, stage: str) -> bool:
    """``dvc repro --single-item`` one stage in this process; True if it ran,
    False if it was up to date. A failure raises :class:`StageFailedError` with
    the stage's own error."""
    from dvc.exceptions import ReproductionError
    from dvc.repo import Repo

    with stage_error_file(project, "saap-error") as error_file:
        os.environ["SAAP_STAGE_ERROR_FILE"] = str(error_file)
        try:
            # DVC resolves some paths against the working directory
            with contextlib.chdir(project), Repo(str(project)) as repo:
                ran = repo.reproduce(stage, single_item=True)
        except ReproductionError as exc:
            raise StageFailedError(
                f"stage {stage} failed: {_failure(error_file, str(exc))}"
            ) from exc
        finally:
            os.environ.pop("SAAP_STAGE_ERROR_FILE", None)
    return bool(ran)


def exp_run(project: Path, stage: str, name: str, set_params: dict[str, str]) -> None:
    """``dvc exp run <stage> --name <name> -S key=value ...`` in a subprocess (an
    experiment of that name left by an interrupted run is removed first). A
    failure raises :class:`StageFailedError` with the stage's own error."""
    command = [sys.executable, "-m", "dvc", "exp", "run", stage, "--name", name]
    for key, value in set_params.items():
        command += ["-S", f"{key}={value}"]
    with stage_error_file(project, "saap-exp-error") as error_file:
        env = os.environ | {
            "SAAP_STAGE_ERROR_FILE": str(error_file),
            # the stage's `python` is this interpreter's
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        # `dvc exp run --name` refuses a name left by an interrupted run (same
        # baseline commit); that experiment was never gathered
        subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "remove", name],
            cwd=project,
            env=env,
            check=False,
            capture_output=True,
        )
        result = subprocess.run(command, cwd=project, env=env, check=False)
        if result.returncode != 0:
            fallback = f"`{' '.join(command[2:])}` exited with {result.returncode}"
            raise StageFailedError(
                f"experiment {name} failed: {_failure(error_file, fallback)}"
            )
