"""The ``saap`` command: run single stages, the pipeline, the comparison, deploy,
read and apply gates. It drives stages/ and flows/, so it lives above them, outside
the library (saap/ imports neither; tests/contracts/test_layering.py)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from saap.errors import SaapError

app = typer.Typer(
    add_completion=False,
    help="The saap command: run single stages, the pipeline, the comparison, "
    "deploy, read and apply gates.",
    no_args_is_help=True,
)

STAGES = {
    "assets": "fetch pinned packages; write models/base and data/{eval,text,instruct}",
    "calibration": "seeded calibration token windows (data/calibration)",
    "importance": "score every prunable group with every estimator",
    "ranking": "fuse scores, rank layers, allocate ratios: artifacts/plan/plan.json",
    "prune": "replay the plan on the base model: models/pruned",
    "export": "write a checkpoint as GGUF (f16 + quantized types) for llama.cpp: "
    "models/gguf/<variant>",
}


def _stage_command(name: str, help_text: str) -> None:
    @app.command(
        name,
        help=f"Stage {name}: {help_text}. Options go to `python -m stages.{name}`.",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def command(ctx: typer.Context) -> None:
        module = importlib.import_module(f"stages.{name}")
        try:
            module.main(list(ctx.args))
        except SaapError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


for _name, _help in STAGES.items():
    _stage_command(_name, _help)


@app.command("check-params")
def check_params(
    path: Annotated[Path, typer.Option("--params")] = Path("params.yaml"),
) -> None:
    """Validate every section of params.yaml and print it resolved."""
    from saap.params import SECTIONS, parse_section, read_params_file

    raw = read_params_file(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        typer.echo(
            f"error: unknown section(s) {unknown}; known: {sorted(SECTIONS)}", err=True
        )
        raise typer.Exit(2)
    try:
        for name in raw:
            typer.echo(f"{name}: {parse_section(name, raw[name]).model_dump()}")
    except SaapError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def repro(
    stage: str = typer.Argument(
        None, help="Stage to bring up to date (all by default)"
    ),
) -> None:
    """Bring the DVC pipeline up to date (``dvc repro``): DVC decides what is stale."""
    command = [sys.executable, "-m", "dvc", "repro"] + ([stage] if stage else [])
    raise typer.Exit(subprocess.call(command))


@app.command()
def run(
    project: Annotated[Path, typer.Option(help="Project folder")] = Path("."),
    force: Annotated[
        bool, typer.Option(help="Run the flow even if up to date")
    ] = False,
) -> None:
    """Run the compress flow: DVC stages, MLflow logging, registry and gates.

    Prefect's temporary local server is used unless PREFECT_API_URL is set. When
    DVC reports every stage up to date and the registry already holds this model,
    nothing would change: the run stops there (``--force`` runs the flow anyway).
    """
    if not force and (summary := _up_to_date(project.resolve())) is not None:
        typer.echo(json.dumps(summary, indent=2))
        return
    _quiet_prefect()
    from flows.compress import compress

    try:
        summary = compress(project=str(project.resolve()))
    except SaapError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def compare(
    project: Annotated[Path, typer.Option(help="Project folder")] = Path("."),
    run_id: Annotated[
        str | None,
        typer.Option(help="Continue this comparison run (arms gathered are kept)"),
    ] = None,
    report_dir: Annotated[
        str, typer.Option(help="Folder of results.md and figures/")
    ] = "docs",
    report_only: Annotated[
        bool,
        typer.Option(
            help="Render the report again from the arms of --run-id as gathered "
            "(runs no arm, logs no MLflow run)"
        ),
    ] = False,
) -> None:
    """Run the compare flow: every method and ratio of params.yaml:compare as a
    DVC experiment, gathered into docs/results.md, plots and MLflow runs."""
    _quiet_prefect()
    from flows.compare import compare as compare_flow

    try:
        summary = compare_flow(
            project=str(project.resolve()),
            run_id=run_id,
            report_dir=report_dir,
            report_only=report_only,
        )
    except SaapError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    summary.pop("rows")
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def deploy(
    cron: Annotated[str, typer.Option(help="Cron schedule")] = "0 2 * * *",
    pool: Annotated[str, typer.Option(help="Process work pool")] = "saap-process",
    project: Annotated[Path, typer.Option(help="Project folder")] = Path("."),
    profile: Annotated[
        str, typer.Option(help="Evaluation profile of the scheduled runs")
    ] = "nightly",
    heartbeat_s: Annotated[
        int,
        typer.Option(
            help="Seconds between a run's heartbeats; 3 missed mark it Crashed"
        ),
    ] = 60,
) -> None:
    """Create the nightly deployment (needs a Prefect server: PREFECT_API_URL)."""
    _quiet_prefect()
    from flows.deploy import deploy_nightly

    try:
        deployment_id = deploy_nightly(
            project, cron=cron, pool=pool, profile=profile, heartbeat_s=heartbeat_s
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"deployment compress/nightly ({deployment_id}) on pool {pool}, cron "
        f"{cron!r}; start a worker with: prefect worker start --pool {pool}"
    )


def _up_to_date(project: Path) -> dict | None:
    """A summary if no stage is stale and the newest registered version is this
    very model; None if the flow has work to do."""
    import contextlib

    from dvc.repo import Repo

    if not (project / "dvc.lock").is_file():
        return None
    with contextlib.chdir(project), Repo(str(project)) as repo:
        # the project's own pipeline only: compare/dvc.yaml's lock records
        # whichever comparison arm ran last, so it is always "changed"
        if repo.status(targets=["dvc.yaml"]):
            return None
    from flows import tracking

    gates = _gates_params(project)
    identity = {
        "model_md5": tracking.model_md5(project, gates.variant),
        "evidence_md5": tracking.evidence_md5(project, gates.variant),
    }
    client = tracking.client_for(project)
    name = tracking.registered_name(project, gates)
    latest = tracking.latest_version(client, name)
    if latest is None or not all(
        value and latest.tags.get(key) == value for key, value in identity.items()
    ):
        return None
    champion = tracking.champion_version(client, name)
    return {
        "registered_model": name,
        "version": str(latest.version),
        "champion": str(champion.version) if champion else None,
        "stages_ran": [],
        "note": "every stage is up to date and this model and its evaluation are "
        "already registered",
    }


def _quiet_prefect() -> None:
    """No telemetry from the temporary server (it also races on its SQLite file)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _gates_params(project: Path):
    from saap.params import load_section

    return load_section(project / "params.yaml", "gates")


_GATE_FIELDS = ("value", "lower", "upper", "mode", "threshold", "detail")


@app.command()
def gates(
    version: Annotated[str, typer.Option(help="Registered version")] = "candidate",
    project: Annotated[Path, typer.Option(help="Project folder")] = Path("."),
) -> None:
    """Show the recorded gate values, intervals and verdicts of a version."""
    from flows import tracking

    project = project.resolve()
    try:
        client = tracking.client_for(project)
        name = tracking.registered_name(project, _gates_params(project))
        model_version = tracking.get_version(client, name, version)
    except SaapError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    tags = dict(model_version.tags)
    typer.echo(
        f"{name} v{model_version.version} ({tags.get('method', '?')}, "
        f"ratio {tags.get('ratio', '?')}, profile {tags.get('eval_profile', '?')}, "
        f"eval config {tags.get('eval_config_hash', '?')}): gates "
        f"{tags.get('gates', 'not applied')} "
        f"(thresholds from {tags.get('gates.thresholds_source', '?')})"
    )
    for key in sorted(
        k for k in tags if k.startswith("gate.") and k.endswith(".verdict")
    ):
        gate = key.removeprefix("gate.").removesuffix(".verdict")
        field = {f: tags.get(f"gate.{gate}.{f}") for f in _GATE_FIELDS}
        typer.echo(
            f"  {gate:20s} {tags[key]:4s} {field['value']} [{field['lower']}, "
            f"{field['upper']}] {field['mode']} {field['threshold']}: "
            f"{field['detail']}"
        )
    aliases = client.get_registered_model(name).aliases
    typer.echo(f"aliases: {aliases}")


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Registered version number")],
    project: Annotated[Path, typer.Option(help="Project folder")] = Path("."),
    use_params: Annotated[
        bool,
        typer.Option(
            "--use-params",
            help="Gate with params.yaml's thresholds instead of the ones recorded "
            "when the version was gated",
        ),
    ] = False,
    lock_timeout_s: Annotated[float, typer.Option(help="Wait for the lock")] = 60.0,
) -> None:
    """Re-apply the gates to a version (under the project lock, with the
    thresholds recorded when it was gated); move ``champion`` if all pass."""
    from flows import tracking
    from flows.compress import project_lock

    project = project.resolve()
    try:
        with project_lock(project, lock_timeout_s):
            client = tracking.client_for(project)
            current = _gates_params(project)
            name = tracking.registered_name(project, current)
            model_version = tracking.get_version(client, name, version)
            recorded = tracking.recorded_gates_params(model_version)
            if use_params or recorded is None:
                params, source = current, "params.yaml"
            else:
                params, source = recorded, "recorded"
            results, promoted = tracking.apply_gates(
                client, name, model_version.version, params, source
            )
    except SaapError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"thresholds: {source}")
    for result in results:
        typer.echo(
            f"  {result.name:20s} {'pass' if result.passed else 'FAIL'} "
            f"{result.value} [{result.lower}, {result.upper}] "
            f"{result.direction} {result.threshold} ({result.mode}): {result.detail}"
        )
    typer.echo(
        f"{name} v{model_version.version}: "
        f"{'champion' if promoted else 'champion unchanged'}"
    )
    if not promoted:
        raise typer.Exit(1)


@app.command()
def status(
    project: Annotated[Path, typer.Option(help="Project folder")] = Path("."),
) -> None:
    """Stale stages, the candidate and the champion with their gate verdicts, the
    last tracked run and the next scheduled nightly run."""
    import contextlib

    from dvc.repo import Repo

    from flows import tracking

    project = project.resolve()
    with contextlib.chdir(project), Repo(str(project)) as repo:
        stale = sorted(
            name
            for name in repo.status()
            if ":" not in name  # main dvc.yaml only
        )
    typer.echo(f"stale stages: {', '.join(stale) if stale else 'none'}")
    try:
        client = tracking.client_for(project)
        name = tracking.registered_name(project, _gates_params(project))
    except SaapError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for alias in ("candidate", "champion"):
        try:
            version = tracking.get_version(client, name, alias)
        except SaapError:
            typer.echo(f"{alias}: none")
            continue
        tags = dict(version.tags)
        failed = sorted(
            k.removeprefix("gate.").removesuffix(".verdict")
            for k, v in tags.items()
            if k.startswith("gate.") and k.endswith(".verdict") and v != "pass"
        )
        typer.echo(
            f"{alias}: {name} v{version.version} ({tags.get('method', '?')}, ratio "
            f"{tags.get('ratio', '?')}): gates {tags.get('gates', 'not applied')}"
            + (f" (failed: {', '.join(failed)})" if failed else "")
        )
    runs = client.search_runs(
        [tracking.experiment_id(client, project)],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if runs:
        last = runs[0].info
        started = time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(last.start_time / 1000)
        )
        typer.echo(f"last run: {last.run_name} {last.status}, started {started}")
    else:
        typer.echo("last run: none")
    typer.echo(f"next nightly run: {_next_nightly()}")


def _next_nightly() -> str:
    """When the nightly deployment next runs, from its cron schedule."""
    from datetime import UTC, datetime

    from flows.deploy import read_deployment

    try:
        deployment = read_deployment()
    except Exception as exc:  # noqa: BLE001 - Prefect's not-found or connection errors
        return (
            f"no nightly deployment on the Prefect API ({type(exc).__name__}); "
            "create it with `saap deploy`"
        )
    crons = [
        s.schedule for s in deployment.schedules if getattr(s.schedule, "cron", None)
    ]
    if not crons:
        return "the nightly deployment has no cron schedule"
    try:
        from zoneinfo import ZoneInfo

        from cronsim import CronSim
    except ImportError:
        return ", ".join(f"cron {c.cron}" for c in crons)
    upcoming = []
    for cron in crons:
        zone = ZoneInfo(cron.timezone or "UTC")
        upcoming.append(next(iter(CronSim(cron.cron, datetime.now(zone)))))
    first = min(upcoming, key=lambda d: d.astimezone(UTC))
    return f"{first.isoformat()} (cron {crons[0].cron})"


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
