"""infra/: the compose file's contract, checked without a Docker engine (and
with `docker compose config` where one is present). The MLflow service's
command, infra/mlflow-server.sh, runs for real in tests/services against
PostgreSQL and S3 (test_the_compose_mlflow_server_needs_a_login)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
SECRET = re.compile(r"PASSWORD|SECRET|_KEY$|AUTH_STRING|ACCESS_KEY")
# ${NAME}, ${NAME:-default}, ${NAME:?message}; $$ escapes the compose file
REFERENCE = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?([-?])[^}]*)?\}")

pytestmark = pytest.mark.unit


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def example() -> dict[str, str]:
    values = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def test_every_image_is_pinned_and_the_project_image_is_built_from_the_lock():
    services = compose()["services"]
    for name, service in services.items():
        image = service.get("image", "")
        assert image, f"{name} has no image"
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image} is not pinned"
        assert re.search(r"\d", tag), f"{name}: {image} names no version"
        if "build" in service:
            assert service["build"]["dockerfile"] == "infra/Dockerfile"
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M)[1]
    assert re.search(r":\d+\.\d+\.\d+", base), f"base image {base} is not pinned"
    assert "--require-hashes" in dockerfile and "requirements.lock" in dockerfile
    assert {"postgres", "s3", "mlflow", "prefect", "worker"} <= set(services)


def test_every_long_running_service_has_a_healthcheck():
    for name, service in compose()["services"].items():
        if service.get("restart") == "no":  # one-shot set-up
            continue
        check = service.get("healthcheck", {}).get("test")
        assert check, f"{name} has no healthcheck"


def test_no_secret_is_written_in_the_compose_file():
    services = compose()["services"]
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET.search(key):
                assert REFERENCE.fullmatch(value), f"{name}.{key} is written in"
            if "://" in value and "@" in value:  # credentials in a URI
                user_info = value.split("://", 1)[1].split("@", 1)[0]
                assert "${" in user_info, f"{name}.{key} has a literal login"
    text = COMPOSE.read_text()
    for name, value in example().items():
        if SECRET.search(name):
            assert value not in text, f"the example's {name} is in the compose file"


def test_every_variable_is_in_the_example_env_and_the_real_one_is_ignored():
    text = COMPOSE.read_text()
    documented = (INFRA / ".env.example").read_text()
    values = example()
    for match in REFERENCE.finditer(text):
        name, mode = match[1], match[2]
        assert re.search(rf"^#?\s*{name}=", documented, re.M), (
            f"${{{name}}} is used by the compose file but not in infra/.env.example"
        )
        if mode == "?":  # required: the example sets it
            assert values.get(name), f"{name} is required but unset in the example"
    assert len(values["MLFLOW_ADMIN_PASSWORD"]) >= 12  # MLflow refuses shorter
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, "infra/.env must be gitignored"


def test_the_services_run_what_the_tests_run():
    services = compose()["services"]
    assert services["mlflow"]["command"] == ["sh", "infra/mlflow-server.sh"]
    worker = services["worker"]["command"]
    assert worker[:3] == ["prefect", "worker", "start"]
    assert "--pool" in worker and "--with-healthcheck" in worker
    assert services["prefect"]["command"][:3] == ["prefect", "server", "start"]
    init = (INFRA / "postgres-init.sql").read_text()
    for database in ("prefect", "mlflow_auth"):
        assert f"CREATE DATABASE {database};" in init
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_AUTH_DATABASE_URI"].endswith("/mlflow_auth")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("/mlflow")


def test_mlflow_server_script_names_what_is_missing(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    result = subprocess.run(
        ["sh", str(INFRA / "mlflow-server.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert name in result.stderr
    assert "infra/.env.example" in result.stderr


def _compose_cli() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=60
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _compose_cli(),
    reason="no `docker compose` on this machine: the compose file is checked by "
    "the tests above, not by Docker",
)
def test_docker_compose_config_validates():
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "--env-file",
         str(INFRA / ".env.example"), "config", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
