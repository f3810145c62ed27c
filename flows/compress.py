"""The ``compress`` flow: run the DVC stages as Prefect tasks, then log to MLflow,
register the compressed model, apply the gates and promote.

DVC decides what is stale: each task is ``dvc repro --single-item <stage>`` in
pipeline order, so an unchanged stage costs a hash check. Only transient failures
(a DVC lock held by another process, a network error while downloading) are
retried. A project-wide file lock keeps two overlapping runs (two nightly
schedules, or a manual run during the nightly one) from touching the same
outputs: the second waits, then fails cleanly if the first does not finish.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.context import get_run_context

from flows import stagerun
from flows.stagerun import (  # noqa: F401  (ConcurrentRunError: part of this API)
    ConcurrentRunError,
    StageFailedError,
    project_lock,
    retry_transient,
)
from saap.errors import ParamsError
from saap.params import GatesParams, load_section

log = logging.getLogger(__name__)


def benched_variants(params_file: Path) -> list[str]:
    """The compressed variants the bench stages measure (``bench.variants``),
    checked to hold the gated variant, whose speed gate reads its bench."""
    return _variants_with_gated(params_file, "bench", "the speed gate reads")


def evaluated_variants(params_file: Path) -> list[str]:
    """The compressed variants the evaluate stages measure beside dense
    (``evaluate.variants``), checked to hold the gated variant."""
    return _variants_with_gated(params_file, "evaluate", "the accuracy gates read")


def _variants_with_gated(params_file: Path, section: str, reader: str) -> list[str]:
    gates = load_section(params_file, "gates")
    variants = load_section(params_file, section).variants
    if gates.variant not in variants:
        folder = "eval" if section == "evaluate" else section
        raise ParamsError(
            f"gates.variant is {gates.variant!r} but {section}.variants is "
            f"{variants}: {reader} metrics/{folder}/{gates.variant}.json; add "
            f"{gates.variant!r} to {section}.variants in {params_file}"
        )
    return variants


def pipeline_stages(project: Path) -> list[str]:
    """Stage names of the project's ``dvc.yaml`` in dependency order (the
    comparison pipeline in ``compare/dvc.yaml`` is not part of it)."""
    import networkx as nx
    from dvc.repo import Repo

    with contextlib.chdir(project), Repo(str(project)) as repo:
        graph = repo.index.graph
        return [
            stage.addressing
            for stage in reversed(list(nx.topological_sort(graph)))
            if ":" not in stage.addressing  # other dvc.yaml files: "path:stage"
        ]


# a stage that runs longer is killed (the nightly profile's evaluate of one
# SmolLM2 checkpoint takes about 45 min on 2 cores; a 7B prune on a GPU hours)
DEFAULT_STAGE_TIMEOUT_S = 6 * 3600.0


@task(
    task_run_name="{stage}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
)
def repro_stage(project: str, stage: str, timeout_s: float | None = None) -> bool:
    """``dvc repro --single-item`` one stage, killed past ``timeout_s``; True if
    it ran, False if up to date."""
    logger = get_run_logger()
    started = time.perf_counter()
    ran = stagerun.repro(Path(project), stage, timeout_s)
    seconds = time.perf_counter() - started
    logger.info("%s: %s (%.1f s)", stage, "ran" if ran else "up to date", seconds)
    return bool(ran)


@task
def track_and_promote(
    project: str,
    mlflow_run_id: str,
    variants: list[str],
    gates: GatesParams,
    flow_run: str | None,
) -> dict:
    """Log the run, register the gated variant and apply the gates."""
    from flows import tracking

    root = Path(project)
    client = tracking.client_for(root)
    tracking.log_run(client, mlflow_run_id, root, variants, flow_run)
    name = tracking.registered_name(root, gates)
    plan_path = root / "artifacts" / "plan" / "plan.json"
    tags = {"variant": gates.variant, "base_model": tracking.base_model_name(root)}
    if plan_path.is_file():
        from saap.plan import load_plan

        plan = load_plan(plan_path)
        tags |= {
            "ratio": f"{plan.achieved_ratio:.4f}",
            "method": f"{plan.importance}/{plan.allocation}",
        }
    revision = tracking.git_revision(root)["git.revision"]
    if revision != "none":
        tags["mlflow.source.git.commit"] = revision
    hashes = tracking.dvc_lock_hashes(root)
    for key in (
        "calibration:data/calibration",
        "assets:data/eval",
        "assets:models/base",
    ):
        if key in hashes:
            tags[f"data.{key.split(':')[1]}"] = hashes[key]
    tags["model_md5"] = tracking.model_md5(root, gates.variant)
    tags["evidence_md5"] = tracking.evidence_md5(root, gates.variant)
    gated = _gate_ungated(client, name, gates)
    latest = tracking.latest_version(client, name)
    if latest is not None and tags["model_md5"] and tags["evidence_md5"]:
        if all(latest.tags.get(k) == tags[k] for k in ("model_md5", "evidence_md5")):
            # the same model and evidence as the newest version: nothing new
            latest = client.get_model_version(name, latest.version)
            champion = tracking.champion_version(client, name)
            return {
                "registered_model": name,
                "version": str(latest.version),
                "promoted": champion is not None
                and str(champion.version) == str(latest.version),
                "gates": gated.get(str(latest.version))
                or "unchanged (same model and evaluation as the newest version)",
                "unchanged": True,
                "gated_earlier_versions": sorted(gated),
            }
    version = tracking.register_version(
        client, mlflow_run_id, root, name, gates.variant, tags
    )
    results, promoted = tracking.apply_gates(client, name, version.version, gates)
    return {
        "registered_model": name,
        "version": str(version.version),
        "promoted": promoted,
        "gates": {r.name: r.as_dict() for r in results},
        "gated_earlier_versions": sorted(gated),
    }


def _gate_ungated(client, name: str, gates: GatesParams) -> dict[str, dict]:
    """Gate every version that was registered but never gated (its run died
    between the two), oldest first, with this run's thresholds."""
    from flows import tracking

    done = {}
    for stale in tracking.ungated_versions(client, name):
        results, _ = tracking.apply_gates(client, name, stale.version, gates)
        done[str(stale.version)] = {r.name: r.as_dict() for r in results}
    return done


@contextlib.contextmanager
def evaluation_profile(params_file: Path, profile: str | None) -> Iterator[None]:
    """Run with ``evaluate.profile`` set to ``profile`` (comments and layout of
    params.yaml kept); params.yaml is restored byte for byte afterwards, so the
    next run on the file's own profile re-evaluates on that one."""
    if profile is None:
        yield
        return
    from ruamel.yaml import YAML

    original = params_file.read_bytes()
    yaml_rt = YAML()
    data = yaml_rt.load(original.decode())
    evaluate = data.setdefault("evaluate", {})
    if evaluate.get("profile", "quick") == profile:
        yield
        return
    load_section(params_file, "evaluate").resolved(profile)  # names a bad profile
    evaluate["profile"] = profile
    try:
        with params_file.open("w") as handle:
            yaml_rt.dump(data, handle)
        yield
    finally:
        params_file.write_bytes(original)


def gate_table(summary: dict) -> str:
    """The gate verdicts of a run as a Markdown table (a Prefect artifact)."""
    gates = summary.get("gates")
    head = (
        f"**{summary['registered_model']} v{summary['version']}**: champion "
        f"{'moved to this version' if summary.get('promoted') else 'unchanged'}\n\n"
    )
    if not isinstance(gates, dict):
        return head + f"{gates}\n"
    from flows.tracking import gate_rows

    return head + gate_rows(gates)


def publish(summary: dict, uri: str) -> None:
    """Prefect artifacts of a run: the gate table, and a link to the registered
    version where the MLflow store has a web address."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    create_markdown_artifact(
        markdown=gate_table(summary),
        key="gates",
        description="Gate verdicts of the registered version",
    )
    if uri.startswith(("http://", "https://")):
        create_link_artifact(
            link=f"{uri.rstrip('/')}/#/models/{summary['registered_model']}"
            f"/versions/{summary['version']}",
            link_text=f"{summary['registered_model']} v{summary['version']}",
            key="mlflow-version",
            description="The registered version in MLflow",
        )


@flow(name="compress", log_prints=True)
def compress(
    project: str = ".",
    lock_timeout_s: float = 3600.0,
    profile: str | None = None,
    stage_timeout_s: float = DEFAULT_STAGE_TIMEOUT_S,
    stage_timeouts: dict[str, float] | None = None,
) -> dict:
    """Run the pipeline, track it in MLflow, register and gate the model.

    ``profile`` overrides ``evaluate.profile`` for this run (the nightly
    deployment passes ``nightly``). A stage running longer than its entry in
    ``stage_timeouts`` (by stage name, e.g. ``{"finetune": 7200}``), else
    ``stage_timeout_s``, is killed and fails the run; its previous outputs stay."""
    from flows import tracking

    logger = get_run_logger()
    # DVC's advice to `git add dvc.lock` after every stage is noise in a flow log
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)
    root = Path(project).resolve()
    # stage commands call `python`: make it this interpreter
    os.environ["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    gates = load_section(root / "params.yaml", "gates")
    # refuse a bad list before any stage
    benched_variants(root / "params.yaml")
    evaluated = evaluated_variants(root / "params.yaml")
    try:
        flow_run = str(get_run_context().flow_run.id)
    except Exception:  # noqa: BLE001 - no context outside a flow run
        flow_run = None
    client = tracking.client_for(root)
    with (
        project_lock(root, lock_timeout_s),
        evaluation_profile(root / "params.yaml", profile),
    ):
        run = client.create_run(
            tracking.experiment_id(client, root),
            run_name=f"compress-{time.strftime('%Y%m%d-%H%M%S')}",
        )
        ran = {}
        try:
            for stage in pipeline_stages(root):
                timeout = (stage_timeouts or {}).get(stage, stage_timeout_s)
                ran[stage] = repro_stage(str(root), stage, timeout)
            variants = ["dense", *evaluated]
            summary = track_and_promote(
                str(root), run.info.run_id, variants, gates, flow_run
            )
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")
    summary |= {
        "mlflow_run_id": run.info.run_id,
        "stages_ran": [s for s, r in ran.items() if r],
    }
    try:
        publish(summary, tracking.tracking_uri(root))
    except Exception as exc:  # noqa: BLE001 - artifacts are a view, not the result
        logger.warning("could not publish the Prefect artifacts: %s", exc)
    if summary.get("unchanged"):
        logger.info(
            "nothing new to register: %s v%s is the same model and evidence",
            summary["registered_model"],
            summary["version"],
        )
        return summary
    logger.info(
        "registered %s v%s; champion %s",
        summary["registered_model"],
        summary["version"],
        "moved" if summary["promoted"] else "unchanged",
    )
    if not summary["promoted"]:
        from prefect.states import Completed

        failed = [
            name
            for name, g in (summary.get("gates") or {}).items()
            if isinstance(g, dict) and not g["passed"]
        ]
        # a named final state the Prefect UI shows; the caller still gets the
        # summary as the flow's result
        return Completed(
            name="NotPromoted",
            message=f"v{summary['version']} not promoted: gates failed: "
            f"{', '.join(failed) or 'see the gate table'}",
            data=summary,
        )
    return summary
