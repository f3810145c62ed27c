"""The nightly deployment of the compress flow on a Prefect process work pool.

``saap deploy`` creates (or updates) the work pool and a deployment with a cron
schedule and a concurrency limit of one run; a worker started with
``prefect worker start --pool <pool>`` then runs it every night. Overlapping
runs are also kept apart by the flow's project lock.

A flow run whose process dies (a killed worker, a lost machine) would stay
"Running" and hold the deployment's one concurrency slot. The deployment's runs
send heartbeats every ``heartbeat_s`` seconds, and ``saap deploy`` also creates
an automation on the Prefect server that sets a run of this deployment Crashed
when ``MISSED_HEARTBEATS`` heartbeats in a row do not arrive (Prefect's
"zombie flow" recipe, scoped to this deployment).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CRON = "0 2 * * *"
DEFAULT_POOL = "saap-process"
DEPLOYMENT = "nightly"
DEFAULT_HEARTBEAT_S = 60  # Prefect's minimum is 30
MISSED_HEARTBEATS = 3
# every state a run of the compress flow can end in (NotPromoted: gates failed)
FINAL_STATES = ("Completed", "NotPromoted", "Failed", "Cancelled", "Crashed")


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
    heartbeat_s: int = DEFAULT_HEARTBEAT_S,
) -> str:
    """Create the nightly deployment and its unresponsive-run automation; return
    the deployment's id."""
    from prefect import flow
    from prefect.client.schemas.schedules import CronSchedule

    check_heartbeat(heartbeat_s)  # before anything on the server changes
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
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}},
        print_next_steps=False,
    )
    ensure_unresponsive_automation(str(deployment_id), heartbeat_s)
    return str(deployment_id)


def check_heartbeat(heartbeat_s: int) -> None:
    if heartbeat_s < 30:
        raise ValueError(
            f"heartbeat_s {heartbeat_s}: Prefect sends flow-run heartbeats at most "
            "every 30 s; use 30 or more"
        )


def automation_name(deployment_id: str) -> str:
    return f"saap: crash unresponsive runs of {deployment_id}"


def ensure_unresponsive_automation(
    deployment_id: str, heartbeat_s: int, missed: int = MISSED_HEARTBEATS
):
    """Create (or replace) the automation that sets a run of the deployment
    Crashed when no heartbeat and no final state arrives for ``missed``
    heartbeat periods after a heartbeat."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    check_heartbeat(heartbeat_s)
    name = automation_name(deployment_id)
    try:
        Automation.read(name=name).delete()
    except ValueError:  # none yet
        pass
    return Automation(
        name=name,
        description="Marks a compress run Crashed when its process stops sending "
        "heartbeats, which frees the deployment's concurrency slot",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                *(f"prefect.flow-run.{state}" for state in FINAL_STATES),
            },
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification(
                {
                    "prefect.resource.id": f"prefect.deployment.{deployment_id}",
                    "prefect.resource.role": "deployment",
                }
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=missed * heartbeat_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {missed * heartbeat_s} s: the run's "
                "process died (worker killed or machine lost)",
            )
        ],
    ).create()


def read_deployment(name: str = f"compress/{DEPLOYMENT}"):
    """The deployment as the Prefect API stores it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)
