"""The compress flow for real: a DVC repository in a temp folder, a Prefect flow
run on the temporary local server, MLflow on SQLite with a registry; tiny fixture
model and data (no downloads)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flowkit import copy_project, set_params

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, text_dir, eval_dir):
    """A copy of the pipeline (code, dvc.yaml, params.yaml) with tiny settings."""
    root = tmp_path_factory.mktemp("project")
    copy_project(root, tiny_model_dir, text_dir, eval_dir)
    set_params(
        root,
        calibration={"num_samples": 8, "holdout_samples": 2, "seq_len": 32},
        importance={
            "batch_size": 2,
            "estimators": ["taylor_vector", "taylor_element1"],
        },
        prune={"ratio": 0.2, "skip_first": 1, "skip_last": 1},
        evaluate={
            "limit": 4,
            "batch_size": 4,
            "ppl_max_windows": 4,
            "ppl_seq_len": 32,
            "prompts": ["the model"],
            "max_new_tokens": 4,
        },
        finetune={
            "max_steps": 2,
            "batch_size": 2,
            "micro_batch_size": 2,
            "val_size": 2,
            "eval_steps": 1,
            "save_steps": 1,
            "cutoff_len": 64,
        },
        bench={
            "prompt_len": 8,
            "decode_tokens": 4,
            "repeats": 2,
            "warmup": 1,
            "threads": 1,
        },
        gates={
            "min_accuracy_retention": 0.0,
            "max_ppl_ratio": 100.0,
            "min_decode_speedup": 0.0,
            "champion_tolerance": 1.0,
        },
    )
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    return root


def run_flow(project: Path, **kwargs) -> dict:
    from flows.compress import compress

    return compress(project=str(project), **kwargs)


def registry(project: Path):
    from flows import tracking

    client = tracking.client_for(project)
    name = "saap-" + json.loads((project / "models/base/saap.json").read_text())["name"]
    return client, name


def test_full_flow_registers_and_promotes(project):
    summary = run_flow(project)
    assert summary["version"] == "1"
    assert summary["promoted"] is True
    assert "assets" in summary["stages_ran"] and "prune" in summary["stages_ran"]
    for variant in ("dense", "pruned", "finetuned"):
        assert (project / f"metrics/eval/{variant}.json").is_file()
        assert (project / f"metrics/bench/{variant}.json").is_file()
    client, name = registry(project)
    version = client.get_model_version(name, "1")
    assert version.tags["gates"] == "pass"
    assert version.tags["gate.accuracy_retention.verdict"] == "pass"
    assert client.get_registered_model(name).aliases == {
        "candidate": 1,
        "champion": 1,
    }
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "pruned.ppl.ptb" in run.data.metrics and "dense.acc.piqa" in run.data.metrics
    assert run.data.params["prune.ratio"] == "0.2"
    assert run.data.tags["git.revision"]
    assert any(tag.startswith("dvc.prune:") for tag in run.data.tags)
    assert "dvc.bench.pruned:metrics/bench/pruned.json" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "pipeline", "plots", "eval", "bench"} <= artifacts


def test_noop_rerun_runs_no_stage(project):
    from saap.cli import _up_to_date

    summary = run_flow(project)
    assert summary["stages_ran"] == []
    assert summary["version"] == "1"  # same model: no new version
    # `saap run` sees that nothing would change and does not start the flow
    quick = _up_to_date(project)
    assert quick is not None and quick["version"] == "1" and quick["stages_ran"] == []


def test_injected_failure_leaves_outputs_and_registry(project):
    pruned_before = tree_hash(project / "models/pruned")
    finetuned_before = tree_hash(project / "models/finetuned")
    client, name = registry(project)
    versions_before = len(client.search_model_versions(f"name='{name}'"))
    set_params(project, prune={"ratio": 0.95, "max_layer_ratio": 0.5})
    with pytest.raises(
        Exception, match="stage ranking failed: PruningError: ratio 0.95"
    ):
        run_flow(project)
    assert tree_hash(project / "models/pruned") == pruned_before
    assert tree_hash(project / "models/finetuned") == finetuned_before
    assert len(client.search_model_versions(f"name='{name}'")) == versions_before
    assert client.get_registered_model(name).aliases["champion"] == 1


def test_ratio_change_reruns_from_ranking_and_failing_gate_keeps_champion(project):
    set_params(
        project,
        prune={"ratio": 0.25, "max_layer_ratio": 0.9},
        gates={"min_decode_speedup": 1000.0},
    )
    summary = run_flow(project)
    ran = set(summary["stages_ran"])
    assert {
        "ranking",
        "prune",
        "finetune",
        "evaluate@finetuned",
        "bench@finetuned",
    } <= ran
    assert not ran & {"assets", "calibration", "importance", "evaluate@dense"}
    assert summary["version"] == "2" and summary["promoted"] is False
    client, name = registry(project)
    version = client.get_model_version(name, "2")
    assert version.tags["gate.decode_speedup.verdict"] == "fail"
    assert version.tags["gates"] == "fail"
    assert client.get_registered_model(name).aliases == {
        "candidate": 2,
        "champion": 1,
    }


def test_promote_reapplies_gates(project):
    from flows import tracking
    from saap.params import load_section

    set_params(project, gates={"min_decode_speedup": 0.0})
    client, name = registry(project)
    results, promoted = tracking.apply_gates(
        client, name, "2", load_section(project / "params.yaml", "gates")
    )
    assert promoted and all(r.passed for r in results)
    assert client.get_registered_model(name).aliases["champion"] == 2


def test_overlapping_run_waits_then_fails_cleanly(project):
    from flows.compress import ConcurrentRunError, project_lock

    pruned_before = tree_hash(project / "models/pruned")
    with (
        project_lock(project, timeout_s=1),
        pytest.raises(ConcurrentRunError, match="another compress run"),
    ):
        run_flow(project, lock_timeout_s=1)
    assert tree_hash(project / "models/pruned") == pruned_before


def test_dvc_push_pull_round_trip(project, tmp_path):
    dvc = [sys.executable, "-m", "dvc"]
    remote = tmp_path / "remote"
    subprocess.run(
        [*dvc, "remote", "add", "-f", "-d", "local", str(remote)],
        cwd=project,
        check=True,
    )
    subprocess.run([*dvc, "push", "-q"], cwd=project, check=True)
    before = tree_hash(project / "models/pruned")
    shutil.rmtree(project / "models/pruned")
    shutil.rmtree(project / ".dvc/cache")
    subprocess.run([*dvc, "pull", "-q"], cwd=project, check=True)
    assert tree_hash(project / "models/pruned") == before


def test_nightly_deployment_has_its_schedule(project):
    from flows.deploy import deploy_nightly, read_deployment

    deploy_nightly(project, cron="0 3 * * *", pool="saap-test-pool")
    deployment = read_deployment()
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == ["0 3 * * *"]
    assert deployment.work_pool_name == "saap-test-pool"
    assert deployment.concurrency_limit == 1 or deployment.global_concurrency_limit
