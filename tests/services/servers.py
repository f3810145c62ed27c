"""Real team-scale services on loopback for the services tests: PostgreSQL
(Debian's postgresql-15 binaries, initdb as a non-root user), an S3-compatible
server (moto's server mode), ``mlflow server`` on Postgres + S3 and a Prefect
server on Postgres. Each is a child process in a temp folder, stopped at the end.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
S3_KEY = {"AWS_ACCESS_KEY_ID": "saap-test", "AWS_SECRET_ACCESS_KEY": "saap-test"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries on this machine, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def wait_http(url: str, process: subprocess.Popen, what: str, log: Path, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}): {tail(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} in {timeout} s: {tail(log)}")


def tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def start(command: list[str], log: Path, env: dict | None = None, cwd=None):
    """A child in its own process group (so its own children stop with it)."""
    return subprocess.Popen(
        command,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )


class Postgres:
    """A throw-away PostgreSQL cluster: trust authentication on 127.0.0.1."""

    user = "saap"

    def __init__(self, bindir: Path):
        self.bindir = bindir
        # pytest's temp folders are private to root; the server runs as
        # `postgres` when the tests run as root (initdb refuses root)
        self.root = Path(tempfile.mkdtemp(prefix="saap-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> Postgres:
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user)
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1",
            "-w",
            "-t",
            "120",
            "start",
        )
        for database in ("mlflow", "prefect"):
            self.create_database(database)
        return self

    def create_database(self, name: str) -> None:
        self._run(
            "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name
        )  # fmt: skip

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Services:
    """Where the servers listen, and the environment a client process needs."""

    folder: Path
    postgres: Postgres
    s3_url: str
    mlflow_url: str
    prefect_url: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ pointed at the services (for a CLI, a worker or a flow)."""
        env = dict(os.environ)
        for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME"):
            env.pop(key, None)
        env.update(S3_KEY)
        env.update(
            AWS_DEFAULT_REGION="us-east-1",
            MLFLOW_S3_ENDPOINT_URL=self.s3_url,
            MLFLOW_TRACKING_URI=self.mlflow_url,
            PREFECT_API_URL=f"{self.prefect_url}/api",
            PREFECT_HOME=str(self.folder / "prefect-client"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        )
        env.update(extra)
        return env

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            region_name="us-east-1",
            aws_access_key_id=S3_KEY["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_KEY["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2")
        return [
            item["Key"]
            for page in pages.paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        ]

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop(process)
        self.postgres.stop()


def start_services(folder: Path, bindir: Path) -> Services:
    """Postgres, the S3 server with buckets ``mlflow`` and ``dvc``, the MLflow
    server (Postgres store, S3 artifacts proxied) and the Prefect server
    (Postgres database)."""
    postgres = Postgres(bindir).start()
    processes: list[subprocess.Popen] = []
    try:
        s3_port = free_port()
        s3_log = folder / "s3.log"
        processes.append(
            start(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                 str(s3_port)],
                s3_log,
            )
        )  # fmt: skip
        s3_url = f"http://127.0.0.1:{s3_port}"
        wait_http(f"{s3_url}/moto-api/", processes[-1], "the S3 server", s3_log)

        mlflow_port = free_port()
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        prefect_port = free_port()
        prefect_url = f"http://127.0.0.1:{prefect_port}"
        services = Services(
            folder, postgres, s3_url, mlflow_url, prefect_url, processes
        )
        client = services.s3()
        for bucket in ("mlflow", "dvc"):
            client.create_bucket(Bucket=bucket)

        mlflow_log = folder / "mlflow.log"
        processes.append(
            start(
                [
                    sys.executable, "-m", "mlflow", "server",
                    "--host", "127.0.0.1", "--port", str(mlflow_port),
                    "--backend-store-uri", postgres.url("mlflow"),
                    "--artifacts-destination", "s3://mlflow/artifacts",
                    "--serve-artifacts", "--workers", "1",
                ],
                mlflow_log,
                env=services.env(),
            )
        )  # fmt: skip
        prefect_log = folder / "prefect.log"
        processes.append(
            start(
                [
                    sys.executable, "-m", "prefect", "server", "start",
                    "--host", "127.0.0.1", "--port", str(prefect_port),
                ],
                prefect_log,
                env=services.env(
                    PREFECT_HOME=str(folder / "prefect-server"),
                    PREFECT_API_DATABASE_CONNECTION_URL=postgres.url(
                        "prefect", "postgresql+asyncpg"
                    ),
                    PREFECT_UI_ENABLED="false",
                ),
            )
        )  # fmt: skip
        wait_http(f"{mlflow_url}/health", processes[1], "mlflow server", mlflow_log)
        wait_http(
            f"{prefect_url}/api/health", processes[2], "prefect server", prefect_log
        )
        return services
    except BaseException:
        for process in reversed(processes):
            stop(process)
        postgres.stop()
        raise
