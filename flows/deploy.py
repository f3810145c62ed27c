"""The nightly deployment of the compress flow on a Prefect process work pool.

``saap deploy`` creates (or updates) the work pool and a deployment with a cron
schedule and a concurrency limit of one run; a worker started with
``prefect worker start --pool <pool>`` then runs it every night. Overlapping
runs are also kept apart by the flow's project lock.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CRON = "0 2 * * *"
DEFAULT_POOL = "saap-process"
DEPLOYMENT = "nightly"


def ensure_process_pool(name: str) -> None:
    """Create the process work pool ``name`` if it does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def deploy_nightly(
    project: Path,
    cron: str = DEFAULT_CRON,
    pool: str = DEFAULT_POOL,
    timezone: str = "UTC",
    profile: str = "nightly",
) -> str:
    """Create the nightly deployment; return its id."""
    from prefect import flow
    from prefect.client.schemas.schedules import CronSchedule

    ensure_process_pool(pool)
    project = project.resolve()
    remote = flow.from_source(
        source=str(project), entrypoint="flows/compress.py:compress"
    )
    deployment_id = remote.deploy(
        name=DEPLOYMENT,
        work_pool_name=pool,
        schedules=[CronSchedule(cron=cron, timezone=timezone)],
        concurrency_limit=1,
        # the nightly run evaluates on the nightly profile (full sets), where
        # accuracy retention decides too (docs/gates.md)
        parameters={"project": str(project), "profile": profile},
        description="Nightly SAAP compression run of this project",
        tags=["saap", "nightly"],
        print_next_steps=False,
    )
    return str(deployment_id)


def read_deployment(name: str = f"compress/{DEPLOYMENT}"):
    """The deployment as the Prefect API stores it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)
