"""Isolated Prefect / MLflow / git state for the flow tests (helpers that copy
the project are in flowkit.py)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module", autouse=True)
def isolated_services(tmp_path_factory):
    """Prefect's temporary server and MLflow's SQLite store live in temp folders;
    git commits (DVC experiments) get an identity."""
    saved = dict(os.environ)
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect"))
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    for who in ("AUTHOR", "COMMITTER"):
        os.environ.setdefault(f"GIT_{who}_NAME", "saap-test")
        os.environ.setdefault(f"GIT_{who}_EMAIL", "saap-test@localhost")
    # the settings Prefect read at import do not follow os.environ: set them in
    # its settings context too (the temporary server gets os.environ)
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 300}):
        yield
    os.environ.clear()
    os.environ.update(saved)
