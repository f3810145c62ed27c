"""The ``compare`` flow: every method and ratio of ``params.yaml:compare`` as a
separate DVC experiment of ``compare/dvc.yaml:arm``, gathered into
``docs/results.md``, plots, and an MLflow parent run with one child per arm.

Each arm is ``dvc exp run compare/dvc.yaml:arm -S compare.method=M -S
compare.ratio=R --name cmp-<run>-<M>-<R>``, so every arm can be listed (``dvc exp
show``), compared (``dvc exp diff``) and restored (``dvc exp apply``) later; the
shared per-seed importance stage runs once and DVC skips it for later arms.
``params.yaml`` is restored when the flow ends, whatever happens. A failed arm
fails the flow with the stage's own message; rerunning with the same ``run_id``
keeps the arms already gathered and continues with the rest.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows import stagerun
from flows.stagerun import StageFailedError, project_lock, retry_transient
from saap.atomic import atomic_file, write_json
from saap.comparison import (
    against_baselines,
    baselines_table,
    plot_accuracy_vs_params,
    plot_kept_fraction_per_method,
    results_table,
    summarise,
)
from saap.errors import DataError, ParamsError
from saap.methods import METHODS, default_method
from saap.params import CompareParams, load_section

ARM_STAGE = "compare/dvc.yaml:arm"
IMPORTANCE_STAGE = "compare/dvc.yaml:importance"
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
EXPERIMENT = "saap-compare"


def arm_name(run_id: str, method: str, ratio: float) -> str:
    return f"cmp-{run_id}-{method.replace('_', '-')}-{round(ratio * 100):02d}"


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def repro_stage(project: str, stage: str) -> bool:
    """``dvc repro --single-item`` one stage; True if it ran, False if up to date."""
    ran = stagerun.repro(Path(project), stage)
    get_run_logger().info("%s: %s", stage, "ran" if ran else "up to date")
    return ran


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def run_arm_experiment(project: str, method: str, ratio: float, name: str) -> dict:
    """One DVC experiment; returns the arm's metrics as DVC recorded them."""
    logger = get_run_logger()
    root = Path(project)
    started = time.perf_counter()
    try:
        stagerun.exp_run(
            root,
            ARM_STAGE,
            name,
            {"compare.method": method, "compare.ratio": str(ratio)},
        )
    except StageFailedError as exc:
        raise StageFailedError(f"arm {method} @ {ratio} failed: {exc}") from exc
    record = json.loads((root / "metrics" / "compare" / "arm.json").read_text())
    if record["method"] != method or (
        method != "dense" and abs(record["ratio"] - ratio) > 1e-9
    ):
        raise StageFailedError(
            f"experiment {name} wrote the metrics of {record['method']} @ "
            f"{record['ratio']}, not of {method} @ {ratio}"
        )
    record["experiment"] = name
    record["revision"] = code_revision(root)
    record["commit"] = commit_of(root)
    logger.info("arm %s @ %.2f: %.0f s", method, ratio, time.perf_counter() - started)
    return record


def arm_file(gathered: Path, method: str, ratio: float) -> Path:
    """Where a comparison run keeps the record of one arm."""
    return gathered / f"{method}-{ratio}.json"


CODE = ("saap", "stages", "flows", "dvc.yaml", "compare/dvc.yaml", "requirements.lock")


def _git(root: Path, *args: str) -> bytes | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, check=False
        )
    except OSError:
        return None
    return result.stdout if result.returncode == 0 else None


def _code_files(root: Path) -> list[str]:
    """The files of ``CODE`` as they are on disk: tracked and untracked (not
    ignored) where ``root`` is a git checkout, every file but caches otherwise."""
    listed = _git(root, "ls-files", "-z", "-c", "-o", "--exclude-standard", "--", *CODE)
    if listed is not None:
        names = {n for n in listed.decode().split("\0") if n}
        return sorted(n for n in names if (root / n).is_file())
    found = []
    for name in CODE:
        path = root / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in candidates:
            if file.is_file() and "__pycache__" not in file.parts:
                found.append(file.relative_to(root).as_posix())
    return sorted(found)


def code_revision(root: Path) -> str:
    """The code and params an arm ran with: a hash of the content of the code
    (``CODE``, as on disk, committed or not) and of params.yaml without the arm's
    own method and ratio. One table is gathered from arms of one revision only.
    It names content, not a commit: a commit that changes only docs or tests
    keeps it, so a comparison run can be continued across checkouts."""
    import hashlib

    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    params.get("compare", {}).pop("method", None)
    params.get("compare", {}).pop("ratio", None)
    digest = hashlib.sha256()
    for name in _code_files(root):
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256((root / name).read_bytes()).digest())
    digest.update(json.dumps(params, sort_keys=True).encode())
    return f"code-{digest.hexdigest()[:16]}"


def commit_of(root: Path) -> str:
    """git HEAD (12 digits) where an arm ran; "no-git" outside a checkout."""
    head = _git(root, "rev-parse", "HEAD")
    return head.decode().strip()[:12] if head else "no-git"


def _pass_seconds(rows: list[dict]) -> str:
    values = [r["calibration_pass_s"] for r in rows if r.get("calibration_pass_s")]
    return f"{sum(values) / len(values):.0f} s" if values else "(not recorded)"


def write_report(
    rows: list[dict],
    params: CompareParams,
    report_dir: Path,
    run_id: str,
    wall_s: float,
    experiments: list[str],
    revision: str = "?",
    records: list[dict] | None = None,
    default: str | None = None,
    rendered: str | None = None,
) -> Path:
    """``results.md`` (the generated part between markers, text around it kept)
    and the two plots under ``figures/``. With ``records`` and ``default`` (the
    method that is the pipeline's default), a section pairs that method with
    every baseline over seeds. ``rendered``: the code revision that rendered the
    report when it is not the arms' own (``saap compare --report-only``)."""
    figures = report_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name, plot in (
        ("compare_accuracy_vs_params.png", plot_accuracy_vs_params),
        ("compare_kept_fraction.png", plot_kept_fraction_per_method),
    ):
        with atomic_file(figures / name) as tmp:
            plot(rows, tmp)
    seeds = ", ".join(map(str, params.seeds))
    generated = "\n".join(
        [
            BEGIN,
            f"Comparison run `{run_id}`: `saap compare` (the `compare` flow), "
            f"{wall_s / 60:.1f} min wall on this machine in all "
            f"({os.cpu_count()} CPU threads), {len(experiments)} DVC experiments "
            f"(`dvc exp show` lists them as `cmp-{run_id}-*`).",
            "",
            f"- Same for every method: calibration windows of seeds {seeds} "
            "(pruning-only rows: mean ± sample std over the seeds); recovery on the "
            f"first seed, {params.finetune_steps} optimizer steps of the finetune "
            "section's batch (same tokens for every method); zero-shot on the first "
            f"{params.limit or 'all'} documents of each task, perplexity on "
            f"{params.ppl_windows or 'all'} windows of 128 tokens (PTB test; the "
            "evaluation half of the Wikipedia prose), KL to dense on "
            f"{params.fidelity_windows} held-back C4 windows. Task columns are "
            "acc_norm where the task defines it (PIQA, HellaSwag, ARC, OBQA), "
            "acc otherwise (BoolQ, WinoGrande); mean score is their mean. "
            "Retention: mean score / dense on the first seed's documents with a "
            "paired bootstrap 95% interval; 'vs best of ratio': 'below best' only "
            "where the paired difference to the best row of that ratio excludes 0, "
            "else 'not separated'. Every arm ran at one code revision "
            f"(`{revision}`: the content of {', '.join(CODE)} and params.yaml"
            f"{_commits_text(records)})"
            + (
                f"; this report was rendered from the gathered arms at `{rendered}`."
                if rendered and rendered != revision
                else "."
            ),
            _speed_text(rows)
            + " Prune s: ranking and slicing only (mean over seeds); the "
            "statistics pass shared by all methods, which scores every estimator "
            f"at once, took {_pass_seconds(rows)} per seed on top of it.",
            "",
            results_table(rows),
            "",
            *_baselines_section(records, default),
            "![accuracy vs parameters](figures/compare_accuracy_vs_params.png)",
            "",
            "![kept fraction per layer](figures/compare_kept_fraction.png)",
            END,
        ]
    )
    path = report_dir / "results.md"
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        text = old[: old.index(BEGIN)] + generated + old[old.index(END) + len(END) :]
    else:
        text = "# Side-by-side comparison\n\n" + generated + "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path


def _commits_text(records: list[dict] | None) -> str:
    commits = sorted({r["commit"] for r in records or [] if r.get("commit")})
    if not commits:
        return ""
    return "; run at commit " + ", ".join(f"`{c}`" for c in commits)


def _speed_text(rows: list[dict]) -> str:
    repeats = {r["bench_repeats"] for r in rows if r.get("bench_repeats")}
    rounds = "/".join(str(n) for n in sorted(repeats)) or "?"
    if any(r.get("speedup_interval") for r in rows):
        return (
            "- Decode speedup (PyTorch eager, bfloat16): batch-1 decode tokens/s "
            "with KV cache over the dense model's, timed interleaved with the dense "
            f"model in the arm's own process, {rounds} rounds: the median of the "
            "per-round ratios with its bootstrap 95% interval, beside the ideal "
            "one (weight bytes read per token)."
        )
    return (
        "- Decode speedup (PyTorch eager, bfloat16): batch-1 decode tokens/s with "
        "KV cache over the dense arm's, each measured in its own process (median "
        f"of {rounds}; no interval: load between the two processes moves it), "
        "beside the ideal one (weight bytes read per token)."
    )


def _baselines_section(records: list[dict] | None, default: str | None) -> list[str]:
    if not records or default is None:
        return []
    entries = against_baselines(records, default)
    if not entries:
        return []
    label = METHODS[default].label
    return [
        f"### SAAP's default ({label}: the prune section's scores, allocation and "
        "compensation) against every baseline, paired over calibration seeds",
        "",
        "Lower is better for all three metrics. SAAP default / baseline: geometric "
        "mean of the per-seed ratios, 95% t-interval; 'ahead' or 'behind' only "
        "where it excludes 1. The goal lines test the comparison's goal: ahead of "
        "the best baseline (lowest mean) by more than the larger seed sd.",
        "",
        baselines_table(entries),
        "",
    ]


@task
def log_to_mlflow(
    project: str, run_id: str, records: list[dict], rows: list[dict], report: str
) -> str:
    """A parent run with the report and plots, one child run per arm."""
    from flows import tracking

    root = Path(project)
    client = tracking.client_for(root)
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment = (
        found.experiment_id
        if found
        else client.create_experiment(
            EXPERIMENT,
            artifact_location=None
            if os.environ.get("MLFLOW_TRACKING_URI")
            else (root.resolve() / "mlartifacts").as_uri(),
        )
    )
    parent = client.create_run(experiment, run_name=f"compare-{run_id}")
    pid = parent.info.run_id
    for key, value in tracking.git_revision(root).items():
        client.set_tag(pid, key, value)
    report_path = Path(report)
    client.log_artifact(pid, str(report_path))
    for figure in sorted((report_path.parent / "figures").glob("compare_*.png")):
        client.log_artifact(pid, str(figure), "figures")
    for record in records:
        name = record.get("experiment") or f"{record['method']}-{record['ratio']}"
        child = client.create_run(
            experiment,
            run_name=name,
            tags={"mlflow.parentRunId": pid, "dvc.experiment": name},
        )
        cid = child.info.run_id
        client.log_param(cid, "method", record["method"])
        client.log_param(cid, "ratio", record["ratio"])
        if record["method"] in METHODS:
            spec = METHODS[record["method"]]
            client.log_param(cid, "importance", spec.importance)
            client.log_param(cid, "allocation", spec.allocation)
        for row in rows:
            if row["method"] != record["method"] or row["ratio"] != record["ratio"]:
                continue
            prefix = row["recovery"] or "pruned"
            metrics = {f"{prefix}.mean_acc": row["mean_acc"][0]}
            metrics[f"{prefix}.mean_acc_std"] = row["mean_acc"][1]
            if row.get("kl"):
                metrics[f"{prefix}.kl"] = row["kl"][0]
            for key in ("value", "lower", "upper"):
                if row.get("retention"):
                    metrics[f"{prefix}.retention.{key}"] = row["retention"][key]
            for corpus, (mean, spread) in row["ppl"].items():
                metrics[f"{prefix}.ppl.{corpus}"] = mean
                metrics[f"{prefix}.ppl.{corpus}_std"] = spread
            for task_name, (mean, _) in row["acc"].items():
                metrics[f"{prefix}.acc.{task_name}"] = mean
            metrics[f"{prefix}.params"] = row["params"]
            for key in ("speedup_measured", "speedup_ideal", "decode_tokens_per_s"):
                if key in row:
                    metrics[key] = row[key]
            for key, value in metrics.items():
                client.log_metric(cid, key, float(value))
        with_path = root / "artifacts" / "compare" / "runs" / run_id
        gathered_file = arm_file(with_path, record["method"], record["ratio"])
        if gathered_file.is_file():
            client.log_artifact(cid, str(gathered_file))
        client.set_terminated(cid, "FINISHED")
    client.set_terminated(pid, "FINISHED")
    return pid


@flow(name="compare", log_prints=True)
def compare(
    project: str = ".",
    run_id: str | None = None,
    report_dir: str = "docs",
    lock_timeout_s: float = 3600.0,
    report_only: bool = False,
) -> dict:
    """Run every arm as a DVC experiment, gather, report, log to MLflow.

    ``report_only``: render the report again from the arms of ``run_id`` as they
    were gathered: runs no arm, logs no MLflow run; the report names the arms'
    revision and the one that rendered it."""
    logger = get_run_logger()
    # DVC's advice to `git add dvc.lock` after every stage is noise in a flow log
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)
    root = Path(project).resolve()
    params = load_section(root / "params.yaml", "compare")
    arms = [("dense", 0.0)] + [(m, r) for r in params.ratios for m in params.methods]
    default = default_method(load_section(root / "params.yaml", "prune"))
    if report_only:
        return _report_only(root, run_id, params, arms, report_dir, default)
    run_id = run_id or time.strftime("%Y%m%d%H%M%S")
    gathered = root / "artifacts" / "compare" / "runs" / run_id
    gathered.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = []
    params_file = root / "params.yaml"
    original = params_file.read_bytes()
    os.environ["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    with project_lock(root, lock_timeout_s):
        try:
            repro_stage(str(root), "assets")
            # the arms' distillation may read the dense model's samples
            repro_stage(str(root), "teacher-text")
            repro_stage(str(root), IMPORTANCE_STAGE)
            revision = code_revision(root)
            for method, ratio in arms:
                path = arm_file(gathered, method, ratio)
                if path.is_file():
                    earlier = json.loads(path.read_text())
                    if earlier.get("revision") == revision:
                        logger.info("arm %s @ %s: kept (same revision)", method, ratio)
                        records.append(earlier)
                        continue
                    logger.info(
                        "arm %s @ %s was gathered under revision %s, not %s: re-run",
                        method,
                        ratio,
                        earlier.get("revision"),
                        revision,
                    )
                record = run_arm_experiment(
                    str(root), method, ratio, arm_name(run_id, method, ratio)
                )
                write_json(path, record)
                records.append(record)
        finally:
            params_file.write_bytes(original)
    # wall time of this comparison run over every invocation (a continued run
    # adds the arms it ran)
    meta_path = gathered / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta["wall_s"] = meta.get("wall_s", 0.0) + time.perf_counter() - started
    meta["invocations"] = meta.get("invocations", 0) + 1
    write_json(meta_path, meta)
    wall_s = meta["wall_s"]
    rows = summarise(records)
    write_json(gathered / "rows.json", rows)
    report = write_report(
        rows,
        params,
        root / report_dir,
        run_id,
        wall_s,
        [r.get("experiment", "") for r in records],
        revision,
        records,
        default,
    )
    parent = log_to_mlflow(str(root), run_id, records, rows, str(report))
    logger.info("comparison %s: %d arms in %.1f min", run_id, len(arms), wall_s / 60)
    return {
        "run_id": run_id,
        "arms": len(arms),
        "rows": rows,
        "report": str(report),
        "mlflow_parent_run": parent,
        "wall_s": wall_s,
    }


def _report_only(
    root: Path,
    run_id: str | None,
    params: CompareParams,
    arms: list[tuple[str, float]],
    report_dir: str,
    default: str | None,
) -> dict:
    if run_id is None:
        raise ParamsError(
            "--report-only renders a gathered run: name it with --run-id (the "
            "folders of artifacts/compare/runs/)"
        )
    gathered = root / "artifacts" / "compare" / "runs" / run_id
    paths = {(m, r): arm_file(gathered, m, r) for m, r in arms}
    missing = [f"{m} @ {r}" for (m, r), path in paths.items() if not path.is_file()]
    if missing:
        raise DataError(
            f"comparison run {run_id} has no gathered arm for {', '.join(missing)} "
            f"(under {gathered}); run `saap compare --run-id {run_id}` to finish it"
        )
    records = [json.loads(path.read_text()) for path in paths.values()]
    revisions = sorted({str(r.get("revision")) for r in records})
    if len(revisions) > 1:
        raise DataError(
            f"comparison run {run_id} mixes arms of revisions {revisions}; one "
            f"table is one revision: run `saap compare --run-id {run_id}` at one "
            "revision to re-run the others"
        )
    meta_path = gathered / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rows = summarise(records)
    report = write_report(
        rows,
        params,
        root / report_dir,
        run_id,
        meta.get("wall_s", 0.0),
        [r.get("experiment", "") for r in records],
        revisions[0],
        records,
        default,
        code_revision(root),
    )
    return {
        "run_id": run_id,
        "arms": len(arms),
        "rows": rows,
        "report": str(report),
        "mlflow_parent_run": None,
        "wall_s": meta.get("wall_s", 0.0),
    }
