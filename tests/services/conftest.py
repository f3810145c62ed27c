"""The services layer: PostgreSQL, an S3 server, ``mlflow server`` and a Prefect
server, started once for the module on loopback (tests/services/servers.py).

Without PostgreSQL's binaries or the S3 server package the tests are skipped
locally with the reason, and fail under CI (``make test`` installs both)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.services.servers import postgres_bin, start_services


def _missing() -> str | None:
    if postgres_bin() is None:
        return (
            "PostgreSQL's server binaries (initdb, pg_ctl) are not installed: "
            "`apt-get install postgresql-15` (make services-deps)"
        )
    for module, package in (("moto", "moto[server]"), ("s3fs", "dvc-s3")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed: pip install -e '.[services]'"
    return None


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    folder = tmp_path_factory.mktemp("services")
    running = start_services(folder, postgres_bin())
    saved = dict(os.environ)
    os.environ.update(
        {k: v for k, v in running.env().items() if k != "PATH"},
    )
    import mlflow
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        temporary_settings,
    )

    # the process-wide MLflow URIs (earlier tests may have set others)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(running.mlflow_url)
    mlflow.set_registry_uri(running.mlflow_url)
    try:
        with temporary_settings(
            {
                PREFECT_API_URL: f"{running.prefect_url}/api",
                PREFECT_HOME: str(folder / "prefect-client"),
            }
        ):
            yield running
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        os.environ.clear()
        os.environ.update(saved)
        running.stop()
