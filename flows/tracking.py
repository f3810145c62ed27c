"""MLflow side of a flow run: log everything, register the model, apply the gates.

Embedded default: a SQLite store ``mlflow.db`` and an artifact folder
``mlartifacts/`` in the project; ``MLFLOW_TRACKING_URI`` points at a team server
instead. One MLflow run per flow run; one registered model per base model, with
alias ``candidate`` on the newest version and ``champion`` on the version that
last passed every gate.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from saap.errors import SaapError
from saap.gates import GateResult, evaluate_gates
from saap.params import GatesParams, parse_section

log = logging.getLogger(__name__)

EXPERIMENT = "saap-compress"


class RegistryError(SaapError):
    """The tracking server or model registry cannot be reached or is inconsistent."""


def tracking_uri(project: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` or the project's SQLite store."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{project.resolve()}/mlflow.db"
    )


def client_for(project: Path) -> MlflowClient:
    uri = tracking_uri(project)
    # a down server should fail the run in seconds, not after minutes of backoff
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means unreachable
        raise RegistryError(
            f"MLflow tracking store {uri} is unreachable ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); start the server or unset "
            "MLFLOW_TRACKING_URI to use the embedded SQLite store"
        ) from None
    return client


def experiment_id(client: MlflowClient, project: Path) -> str:
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (project.resolve() / "mlartifacts").as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value
    return out


def git_revision(project: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=project, capture_output=True, text=True, check=False
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    return {
        "git.revision": git("rev-parse", "HEAD") or "none",
        "git.dirty": "true"
        if git("status", "--porcelain", "--untracked-files=no")
        else "false",
    }


def dvc_lock_hashes(project: Path) -> dict[str, str]:
    """``md5`` of every stage output in ``dvc.lock``: with the git revision, enough
    to reproduce the run (``git checkout`` + ``dvc checkout``/``dvc repro``)."""
    lock = project / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    hashes = {}
    for stage, body in (data.get("stages") or {}).items():
        for out in body.get("outs") or []:
            hashes[f"{stage}:{out['path']}"] = out.get("md5", "")
    return hashes


def model_md5(project: Path, variant: str) -> str:
    """``dvc.lock`` hash of the checkpoint of ``variant`` (pruned or finetuned)."""
    stage = "prune" if variant == "pruned" else "finetune"
    return dvc_lock_hashes(project).get(f"{stage}:models/{variant}", "")


def evidence_md5(project: Path, variant: str) -> str:
    """One hash of the ``dvc.lock`` hashes of everything the gates read for
    ``variant``: its and the dense model's evaluation (metrics and documents)
    and its bench. The same model with new evidence is gated again."""
    import hashlib

    hashes = dvc_lock_hashes(project)
    keys = [
        f"{'evaluate-dense' if who == 'dense' else f'evaluate@{who}'}:"
        f"metrics/eval/{who}{suffix}"
        for who in (variant, "dense")
        for suffix in (".json", ".documents.json")
    ] + [f"bench@{variant}:metrics/bench/{variant}.json"]
    values = [hashes.get(key, "") for key in keys]
    if not all(values):
        return ""
    return hashlib.md5("".join(values).encode()).hexdigest()


def variant_metrics(project: Path, variant: str, bench: bool = True) -> dict:
    """The eval, per-document and bench JSON of a variant, as the stages wrote
    them: ``{"eval", "documents", "bench"}``; ``bench`` None where the variant
    is not benchmarked (``bench=False``: not in ``bench.variants``, so a
    ``metrics/bench`` file left by an earlier configuration is not read)."""
    files = {
        "eval": project / "metrics" / "eval" / f"{variant}.json",
        "documents": project / "metrics" / "eval" / f"{variant}.documents.json",
    }
    if bench:
        files["bench"] = project / "metrics" / "bench" / f"{variant}.json"
    metrics = {}
    for kind, path in files.items():
        if not path.is_file():
            raise RegistryError(
                f"{path} is missing; the {path.parent.name} stage of {variant} "
                "writes it (dvc repro)"
            )
        metrics[kind] = json.loads(path.read_text())
    metrics.setdefault("bench", None)
    return metrics


def _interval_metrics(prefix: str, interval: dict | None, out: dict) -> None:
    if interval:
        for key in ("value", "lower", "upper"):
            out[f"{prefix}.{key}"] = interval[key]


def flat_metrics(variant: str, metrics: dict) -> dict[str, float]:
    """MLflow metric names: ``<variant>.ppl.<corpus>``, ``<variant>.acc.<task>``..."""
    out: dict[str, float] = {}
    evaluation, bench = metrics["eval"], metrics["bench"]
    for corpus, value in evaluation["perplexity"].items():
        out[f"{variant}.ppl.{corpus}"] = value
    for task, scores in evaluation["zero_shot"].items():
        for name in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            if name in scores:
                out[f"{variant}.{name}.{task}"] = scores[name]
    if evaluation["mean_acc"] is not None:
        out[f"{variant}.mean_acc"] = evaluation["mean_acc"]
    out[f"{variant}.params"] = evaluation["params"]
    if fidelity := evaluation.get("fidelity"):
        _interval_metrics(f"{variant}.fidelity.kl", fidelity["kl"], out)
        _interval_metrics(f"{variant}.fidelity.top1", fidelity["top1_agreement"], out)
    if bench is None:
        return out
    for key in (
        "decode_tokens_per_s",
        "prefill_tokens_per_s",
        "time_to_first_token_s",
        "macs_per_token",
        "disk_bytes",
        "peak_rss_mb",
        "weight_bytes_per_token",
    ):
        if key in bench:  # the dense record, derived, has no peak_rss_mb
            out[f"{variant}.{key}"] = bench[key]
    # PyTorch eager, the second runtime: <variant>.torch.speedup.*
    speedup = bench.get("speedup_vs_dense") or {}
    for kind in ("decode", "prefill"):
        _interval_metrics(f"{variant}.torch.speedup.{kind}", speedup.get(kind), out)
    for key in ("decode_ideal", "macs_ratio"):
        if key in speedup:
            out[f"{variant}.torch.speedup.{key}"] = speedup[key]
    # llama.cpp, the edge runtime: <variant>.llamacpp.<type>.*
    for kind, entry in ((bench.get("llamacpp") or {}).get("types") or {}).items():
        prefix = f"{variant}.llamacpp.{kind}"
        for key in (
            "decode_tokens_per_s",
            "prefill_tokens_per_s",
            "file_bytes",
            "decode_ideal",
        ):
            if key in entry:
                out[f"{prefix}.{key}"] = entry[key]
        for phase, interval in (entry.get("speedup") or {}).items():
            _interval_metrics(f"{prefix}.speedup.{phase}", interval, out)
    return out


def plot_accuracy_vs_speed(points: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    runtime = "PyTorch eager"
    for variant, metrics in points.items():
        if metrics["bench"] is None:
            continue
        # llama.cpp's f16 figure where the variant was exported, else eager
        types = (metrics["bench"].get("llamacpp") or {}).get("types") or {}
        if "f16" in types:
            x, runtime = types["f16"]["decode_tokens_per_s"], "llama.cpp f16"
        else:
            x = metrics["bench"]["decode_tokens_per_s"]
        y = metrics["eval"]["mean_acc"] or 0.0
        ax.scatter([x], [y])
        ax.annotate(variant, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(f"decode tokens/s ({runtime}, batch 1, CPU)")
    ax.set_ylabel("mean zero-shot accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def base_model_name(project: Path) -> str:
    info = project / "models" / "base" / "saap.json"
    if info.is_file():
        return json.loads(info.read_text())["name"]
    return "base"


def registered_name(project: Path, params: GatesParams) -> str:
    return params.registered_model or f"saap-{base_model_name(project)}"


def finetune_metrics(project: Path, timestamp: int) -> list[Metric]:
    """The recovery's loss curve (``finetune.train_loss`` and
    ``finetune.val_loss`` per optimizer step) and its totals."""
    path = project / "metrics" / "finetune.json"
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    metrics = [
        Metric("finetune.train_loss", float(loss), timestamp, step)
        for step, loss in enumerate(report.get("train_losses", []), start=1)
    ]
    metrics += [
        Metric("finetune.val_loss", float(loss), timestamp, int(step))
        for step, loss in report.get("val_losses", {}).items()
    ]
    for key in ("tokens", "tokens_per_s", "seconds", "steps", "trainable_params"):
        if isinstance(report.get(key), int | float):
            metrics.append(Metric(f"finetune.{key}", float(report[key]), timestamp, 0))
    return metrics


def log_run(
    client: MlflowClient,
    run_id: str,
    project: Path,
    variants: list[str],
    flow_run: str | None,
) -> dict[str, dict]:
    """Log params, metrics of every variant, plan, plots, samples, revision,
    hashes; bench results of dense and of the variants in ``bench.variants``."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    benched = {"dense", *parse_section("bench", params.get("bench")).variants}
    flat = flatten("", params, {})
    revision = git_revision(project)
    tags = revision | {"flow_run": flow_run or "none", "project": str(project)}
    if revision["git.revision"] != "none":
        tags["mlflow.source.git.commit"] = revision["git.revision"]
    hashes = dvc_lock_hashes(project)
    for key, value in hashes.items():
        # MLflow keys allow [A-Za-z0-9_-. :/]; foreach stages look like bench@pruned
        tags["dvc." + re.sub(r"[^\w\-. :/]", ".", key)] = value
    log_params_and_tags(client, run_id, flat, tags)
    all_metrics = {
        variant: variant_metrics(project, variant, bench=variant in benched)
        for variant in variants
    }
    now = int(time.time() * 1000)
    batch = [
        Metric(key, float(value), now, 0)
        for variant, metrics in all_metrics.items()
        for key, value in flat_metrics(variant, metrics).items()
    ]
    batch += finetune_metrics(project, now)
    for start in range(0, len(batch), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=batch[start : start + 1000])
    for variant in all_metrics:
        for name in (f"{variant}.json", f"{variant}.documents.json"):
            client.log_artifact(run_id, str(project / "metrics/eval" / name), "eval")
        if all_metrics[variant]["bench"] is not None:
            client.log_artifact(
                run_id, str(project / "metrics/bench" / f"{variant}.json"), "bench"
            )
        samples = project / "metrics/eval" / f"{variant}.generations.md"
        if samples.is_file():
            client.log_artifact(run_id, str(samples), "generations")
    for artifact in (
        "artifacts/plan/plan.json",
        "artifacts/plan/kept_fraction.png",
        "metrics/finetune.json",
        "metrics/finetune_loss.csv",
        "dvc.lock",
        "params.yaml",
    ):
        if (project / artifact).is_file():
            client.log_artifact(run_id, str(project / artifact), "pipeline")
    plot = project / "metrics" / "accuracy_vs_speed.png"
    plot_accuracy_vs_speed(all_metrics, plot)
    client.log_artifact(run_id, str(plot), "plots")
    return all_metrics


def log_params_and_tags(
    client: MlflowClient, run_id: str, params: dict, tags: dict[str, str]
) -> None:
    """Params and tags in batched requests (MLflow takes at most 100 params and
    1000 entries in all per request), not one request each."""
    entries = [
        Param(key, json.dumps(value) if not isinstance(value, str) else value)
        for key, value in params.items()
    ]
    for start in range(0, len(entries), 100):
        client.log_batch(run_id, params=entries[start : start + 100])
    tag_entries = [RunTag(key, str(value)) for key, value in tags.items()]
    for start in range(0, len(tag_entries), 1000):
        client.log_batch(run_id, tags=tag_entries[start : start + 1000])


def gate_rows(gates: dict[str, dict]) -> str:
    """Gate verdicts (``GateResult.as_dict()`` by name) as a Markdown table."""
    rows = [
        "| gate | verdict | value | interval | threshold | mode | detail |",
        "|---|---|---:|---|---:|---|---|",
    ]

    def number(value) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    for name, g in gates.items():
        sign = ">=" if g["direction"] == "at_least" else "<="
        rows.append(
            f"| {name} | {'pass' if g['passed'] else 'FAIL'} | {number(g['value'])} "
            f"| [{number(g['lower'])}, {number(g['upper'])}] | {sign} "
            f"{g['threshold']:.4g} | {g['mode']} | {g['detail']} |"
        )
    return "\n".join(rows) + "\n"


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
PROMPT_EXAMPLE = ["The capital of France is"]


def save_pyfunc(checkpoint: Path, out: Path, card=None) -> None:
    """``checkpoint`` as an MLflow pyfunc model in ``out``: the checkpoint folder
    (with ``card``, a ModelCard, as its README.md) as its ``checkpoint``
    artifact, greedy text generation as ``predict`` (flows/mlflow_model.py,
    copied in), a signature (prompt strings in, strings out, ``max_new_tokens``
    and ``temperature`` params) and an input example."""
    import mlflow.pyfunc
    import torch
    import transformers
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", 32),
                ParamSpec("temperature", "double", 0.0),
            ]
        ),
    )
    staged = out.parent / f".{out.name}-checkpoint" / "checkpoint"
    # a hard-linked view of the checkpoint with the card beside its weights
    # (MLflow copies it into the model as artifacts/checkpoint)
    shutil.copytree(checkpoint, staged, copy_function=_link_or_copy)
    if card is not None:
        (staged / "README.md").unlink(missing_ok=True)
        card.save(str(staged / "README.md"))
    mlflow.pyfunc.save_model(
        path=str(out),
        python_model=str(PYFUNC_CODE),
        artifacts={"checkpoint": str(staged)},
        signature=signature,
        input_example=PROMPT_EXAMPLE,
        pip_requirements=[
            f"mlflow=={mlflow.__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}",
            "safetensors",
        ],
    )
    shutil.rmtree(staged.parent)


def register_version(
    client: MlflowClient,
    run_id: str,
    project: Path,
    name: str,
    variant: str,
    tags: dict,
):
    """Log the checkpoint of ``variant`` and register it as a new version."""
    checkpoint = project / "models" / variant
    if not (checkpoint / "config.json").is_file():
        raise RegistryError(f"{checkpoint} holds no checkpoint; its stage did not run")
    from flows.model_card import model_card

    candidate = variant_metrics(project, variant)
    dense = variant_metrics(project, "dense") if variant != "dense" else None
    card = model_card(
        project, variant, name, candidate["eval"], candidate["bench"], dense
    )
    with tempfile.TemporaryDirectory() as folder:
        model_dir = Path(folder) / "model"
        save_pyfunc(checkpoint, model_dir, card)
        client.log_artifacts(run_id, str(model_dir), "model")
    tags = dict(tags) | log_gguf(client, run_id, project, variant)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="SAAP-compressed versions")
    run = client.get_run(run_id)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run_id, tags=tags
    )
    client.set_registered_model_alias(name, "candidate", version.version)
    return version


def log_gguf(client: MlflowClient, run_id: str, project: Path, variant: str) -> dict:
    """Log the variant's quantized GGUF files (the f16 reference stays a DVC output)
    and its export.json under ``gguf/``; version tags with each file's size."""
    folder = project / "models" / "gguf" / variant
    manifest = folder / "export.json"
    if not manifest.is_file():
        return {}
    files = json.loads(manifest.read_text()).get("gguf", {}).get("files", {})
    client.log_artifact(run_id, str(manifest), "gguf")
    tags = {}
    for kind, entry in files.items():
        tags[f"gguf.{kind}.bytes"] = str(entry["bytes"])
        if kind == "f16":
            continue
        client.log_artifact(run_id, str(folder / entry["file"]), "gguf")
        tags[f"gguf.{kind}.artifact"] = f"gguf/{entry['file']}"
    return tags


def version_evidence(client: MlflowClient, name: str, version: str) -> dict:
    """Candidate and dense ``{"eval", "documents", "bench"}`` of a registered
    version, read back from its run's artifacts (what its stages wrote)."""
    model_version = get_version(client, name, version)
    variant = model_version.tags.get("variant", "pruned")
    wanted = {
        "candidate": {
            "eval": f"eval/{variant}.json",
            "documents": f"eval/{variant}.documents.json",
            "bench": f"bench/{variant}.json",
        },
        "dense": {
            "eval": "eval/dense.json",
            "documents": "eval/dense.documents.json",
            "bench": "bench/dense.json",
        },
    }
    evidence: dict = {"candidate": {}, "dense": {}}
    with tempfile.TemporaryDirectory(prefix="saap-gates-") as tmp:
        for who, files in wanted.items():
            for kind, artifact in files.items():
                try:
                    local = client.download_artifacts(
                        model_version.run_id, artifact, tmp
                    )
                except Exception:  # noqa: BLE001 - missing artifact: gate fails
                    log.warning("v%s has no artifact %s", version, artifact)
                    evidence[who][kind] = {}
                    continue
                evidence[who][kind] = json.loads(Path(local).read_text())
    return evidence


def get_version(client: MlflowClient, name: str, version: str):
    """A registered version by number or alias, or one clear error."""
    try:
        if str(version).isdigit():
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, str(version))
    except MlflowException:
        try:
            versions = client.search_model_versions(f"name='{name}'")
            known = sorted(int(v.version) for v in versions)
            aliases = client.get_registered_model(name).aliases
        except MlflowException:
            known, aliases = [], {}
        raise RegistryError(
            f"registered model {name!r} has no version or alias {version!r}; "
            f"versions: {known or 'none'}, aliases: {aliases or 'none'}"
        ) from None


def latest_version(client: MlflowClient, name: str):
    """The newest version of ``name`` (alias ``candidate``), or None."""
    try:
        return client.get_model_version_by_alias(name, "candidate")
    except MlflowException:
        return None


def champion_version(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def ungated_versions(client: MlflowClient, name: str) -> list:
    """Versions registered without a gates verdict (a run that died between
    registering and gating), oldest first: the next run gates them."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    return sorted(
        (v for v in versions if "gates" not in v.tags), key=lambda v: int(v.version)
    )


def recorded_gates_params(model_version) -> GatesParams | None:
    """The thresholds a version was gated with (tag ``gates.params``), if any."""
    raw = model_version.tags.get("gates.params")
    return parse_section("gates", json.loads(raw)) if raw else None


def apply_gates(
    client: MlflowClient,
    name: str,
    version: str,
    params: GatesParams,
    thresholds_source: str = "params.yaml",
) -> tuple[list[GateResult], bool]:
    """Compute every gate, record value, interval, threshold and verdict as
    version tags, and move ``champion`` to ``version`` only if all pass."""
    version = str(version)
    evidence = version_evidence(client, name, version)
    champion = champion_version(client, name)
    champion_evidence = None
    if champion is not None and str(champion.version) != version:
        champion_evidence = version_evidence(client, name, champion.version)[
            "candidate"
        ]
    results = evaluate_gates(
        evidence["candidate"], evidence["dense"], params, champion_evidence
    )
    tags = {
        "eval_config_hash": str(
            evidence["candidate"].get("eval", {}).get("eval_config_hash")
        ),
        "eval_profile": str(evidence["candidate"].get("eval", {}).get("profile")),
        "gates.params": json.dumps(params.model_dump()),
        "gates.thresholds_source": thresholds_source,
        "gates.champion_compared": str(champion.version)
        if champion_evidence is not None
        else "none",
    }
    for result in results:
        prefix = f"gate.{result.name}"
        tags |= {
            f"{prefix}.value": str(result.value),
            f"{prefix}.lower": str(result.lower),
            f"{prefix}.upper": str(result.upper),
            f"{prefix}.threshold": str(result.threshold),
            f"{prefix}.mode": f"{result.direction}/{result.mode}",
            f"{prefix}.verdict": "pass" if result.passed else "fail",
            f"{prefix}.detail": result.detail[:4000],
        }
    promoted = all(result.passed for result in results)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(
        name,
        version,
        description=f"Gates ({'pass' if promoted else 'fail'}, thresholds from "
        f"{thresholds_source}):\n\n"
        + gate_rows({r.name: r.as_dict() for r in results}),
    )
    # the verdict last: a version with a `gates` tag has every gate recorded
    client.set_model_version_tag(name, version, "gates", "pass" if promoted else "fail")
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
    log.info("gates of %s v%s: %s", name, version, "pass" if promoted else "fail")
    return results, promoted
