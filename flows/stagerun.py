"""What both flows need to run stages: the project lock, the error channel a
stage writes its one-line error to (``SAAP_STAGE_ERROR_FILE``, see
stages/common.py), running a DVC stage (``dvc repro --single-item`` in a
subprocess with a timeout: :func:`repro`; as a DVC experiment: :func:`exp_run`)
with that error as the failure's message, and which failures are worth a retry."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from saap.errors import SaapError, SourceError

LOCK_NAME = "saap-compress.lock"


class ConcurrentRunError(SaapError):
    """Another compress run holds the project lock."""


class StageFailedError(SaapError):
    """A DVC stage exited with an error; the message is the stage's own."""


class StageBusyError(StageFailedError):
    """DVC found the stage's files locked (another DVC process, or the lock of
    one that died and is not reaped yet): worth a retry."""


class StageTimeoutError(StageFailedError):
    """A stage ran past its timeout and was killed (previous outputs kept)."""


# DVC's messages when another process holds its repository or file locks
BUSY_MARKERS = ("is busy, it is being blocked by", "Unable to acquire lock")


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
    from dvc.lock import LockError

    text = str(exc).lower()
    if isinstance(exc, LockError | StageBusyError):
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


def stage_env(error_file: Path) -> dict[str, str]:
    """The environment of a DVC subprocess: the stage error channel, and this
    interpreter as the stages' ``python``."""
    return os.environ | {
        "SAAP_STAGE_ERROR_FILE": str(error_file),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def _failure(error_file: Path, fallback: str) -> str:
    """The stage's own one-line error if it wrote one, else ``fallback``."""
    if error_file.is_file():
        text = error_file.read_text().strip()
        if text:
            return text
    return fallback


def stage_changed(project: Path, stage: str) -> bool:
    """Whether ``dvc status`` finds ``stage`` (alone) changed or never run."""
    from dvc.repo import Repo

    with contextlib.chdir(project), Repo(str(project)) as repo:
        return bool(repo.status(targets=[stage], with_deps=False))


def kill_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process under it (DVC and the stage command)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        family = psutil.Process(process.pid).children(recursive=True)
        for member in [*family, psutil.Process(process.pid)]:
            with contextlib.suppress(psutil.Error):
                member.kill()
    process.wait(timeout=60)


def repair_rwlock(project: Path) -> bool:
    """Remove DVC's stage lock table if a killed DVC left it half-written.

    DVC rewrites ``.dvc/tmp/rwlock`` (truncate, then write) when a stage starts
    and ends; a DVC process killed in between leaves it empty or cut short, and
    every later DVC command in the project then fails with "RWLock-file ...
    JSON structure is corrupted". The table only lists stages running now, and
    the process that wrote it is dead (the caller killed it while holding the
    project lock), so an unreadable table is removed: True if it was. A readable
    one is left alone (DVC itself drops entries of dead processes)."""
    path = project / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (json.JSONDecodeError, UnicodeDecodeError):
        path.unlink(missing_ok=True)
        return True
    return False


def _tee(stream, tail) -> None:
    for line in stream:
        sys.stderr.write(line)
        tail.append(line)


def repro(project: Path, stage: str, timeout_s: float | None = None) -> bool:
    """``dvc repro --single-item`` one stage in a subprocess; True if it ran,
    False if it was up to date. A failure raises :class:`StageFailedError` with
    the stage's own error; past ``timeout_s`` the stage is killed and
    :class:`StageTimeoutError` raised. Outputs are ``persist`` (dvc.yaml) and
    written atomically, so a killed or failed stage leaves the previous ones."""
    if not stage_changed(project, stage):
        return False
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    with stage_error_file(project, "saap-error") as error_file:
        env = stage_env(error_file)
        # stdout streams through; stderr too, with its last lines kept for the
        # failure's message (DVC's own errors, e.g. a busy lock, go there)
        process = subprocess.Popen(
            command, cwd=project, env=env, stderr=subprocess.PIPE, text=True
        )
        tail: collections.deque[str] = collections.deque(maxlen=200)
        tee = threading.Thread(
            target=_tee, args=(process.stderr, tail), daemon=True, name="stderr"
        )
        tee.start()
        try:
            code = process.wait(timeout=timeout_s)
        except BaseException as exc:  # the timeout, or this run was stopped
            kill_tree(process)
            if repair_rwlock(project):
                sys.stderr.write(
                    f"stage {stage}: removed DVC's lock table left half-written "
                    "by the killed DVC process\n"
                )
            if isinstance(exc, subprocess.TimeoutExpired):
                raise StageTimeoutError(
                    f"stage {stage} ran past its timeout of {timeout_s:.0f} s and "
                    "was killed; its previous outputs are kept (raise its entry "
                    "in the flow's stage_timeouts, or stage_timeout_s)"
                ) from None
            raise
        tee.join(timeout=10)
        text = "".join(tail)
        if code == 0:
            return True
        fallback = next(
            (line for line in reversed(text.splitlines()) if "ERROR" in line),
            f"`dvc repro --single-item {stage}` exited with {code}",
        )
        message = f"stage {stage} failed: {_failure(error_file, fallback)}"
    if any(marker in text for marker in BUSY_MARKERS):
        raise StageBusyError(message)
    raise StageFailedError(message)


def exp_run(project: Path, stage: str, name: str, set_params: dict[str, str]) -> None:
    """``dvc exp run <stage> --name <name> -S key=value ...`` in a subprocess (an
    experiment of that name left by an interrupted run is removed first). A
    failure raises :class:`StageFailedError` with the stage's own error."""
    command = [sys.executable, "-m", "dvc", "exp", "run", stage, "--name", name]
    for key, value in set_params.items():
        command += ["-S", f"{key}={value}"]
    with stage_error_file(project, "saap-exp-error") as error_file:
        env = stage_env(error_file)
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
