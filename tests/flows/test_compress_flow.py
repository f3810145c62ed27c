"""The compress flow for real: a DVC repository in a temp folder, a Prefect flow
run on the temporary local server, MLflow on SQLite with a registry; tiny fixture
model and data (no downloads)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from flowkit import copy_project, init_repo, set_params, tiny_settings

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
    tiny_settings(root)
    init_repo(root)
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
    # evaluate.variants: dense and the gated variant only (pruned on request)
    evaluated = (project / "metrics/eval").glob("*.json")
    assert sorted(p.name for p in evaluated if p.name.count(".") == 1) == [
        "dense.json",
        "finetuned.json",
    ]
    # bench.variants: the gated variant only (pruned has the same shapes)
    assert sorted(p.name for p in (project / "metrics/bench").iterdir()) == [
        "dense.json",
        "finetuned.json",
    ]
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
    assert "finetuned.ppl.ptb" in run.data.metrics
    assert "dense.acc.piqa" in run.data.metrics
    # the recovery's loss curve, one point per optimizer step
    curve = client.get_metric_history(run.info.run_id, "finetune.train_loss")
    assert [m.step for m in curve] == [1, 2]
    assert run.data.params["prune.ratio"] == "0.2"
    assert run.data.tags["git.revision"]
    assert any(tag.startswith("dvc.prune:") for tag in run.data.tags)
    assert "dvc.bench.finetuned:metrics/bench/finetuned.json" in run.data.tags
    assert not any(key.startswith("pruned.") for key in run.data.metrics)
    assert "finetuned.llamacpp.f16.speedup.decode.lower" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "pipeline", "plots", "eval", "bench", "gguf"} <= artifacts
    # the quantized GGUF goes with the version; the speed gate read llama.cpp
    gguf = {a.path for a in client.list_artifacts(run.info.run_id, "gguf")}
    assert {"gguf/model-q8_0.gguf", "gguf/export.json"} <= gguf
    assert int(version.tags["gguf.q8_0.bytes"]) > 0
    assert "llama.cpp f16 GGUF" in version.tags["gate.decode_speedup.detail"]
    bench = json.loads((project / "metrics/bench/finetuned.json").read_text())
    assert bench["llamacpp"]["types"]["q8_0"]["speedup"]["decode"]["n"] == 4
    # only dense and the benchmarked variants are exported
    assert sorted(p.name for p in (project / "models/gguf").iterdir()) == [
        "dense",
        "finetuned",
    ]
    # benchmarking one more variant leaves the others' results: only its
    # export and bench stages are stale
    assert stale_with(project, bench={"variants": ["pruned", "finetuned"]}) == {
        "export@pruned",
        "bench@pruned",
    }
    # so does evaluating one more variant: only its evaluate stage is stale
    assert stale_with(project, evaluate={"variants": ["pruned", "finetuned"]}) == {
        "evaluate@pruned"
    }


def stale_with(project, **sections) -> set[str]:
    """The stages ``dvc status`` calls stale with ``sections`` changed in
    params.yaml (restored afterwards)."""
    original = (project / "params.yaml").read_text()
    set_params(project, **sections)
    try:
        status = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "--json"],
            cwd=project,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        (project / "params.yaml").write_text(original)
    return set(json.loads(status.stdout))


def test_noop_rerun_runs_no_stage(project):
    from saap_cli import _up_to_date

    summary = run_flow(project)
    assert summary["stages_ran"] == []
    assert summary["version"] == "1"  # same model: no new version
    assert summary["unchanged"] is True
    # `saap run` sees that nothing would change and does not start the flow
    quick = _up_to_date(project)
    assert quick is not None and quick["version"] == "1" and quick["stages_ran"] == []
    # ... even with the comparison pipeline beside it, whose lock records another
    # arm (it is never up to date as a whole, and is not part of `saap run`)
    (project / "compare").mkdir(exist_ok=True)
    shutil.copy(ROOT / "compare" / "dvc.yaml", project / "compare" / "dvc.yaml")
    (project / "compare" / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  arm:\n    cmd: python -m stages.compare arm\n"
    )
    assert _up_to_date(project) is not None
    shutil.rmtree(project / "compare")


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


def test_stage_past_its_timeout_is_killed_and_outputs_kept(project):
    import psutil

    finetuned_before = tree_hash(project / "models/finetuned")
    lock_before = (project / "dvc.lock").read_text()
    client, name = registry(project)
    versions_before = len(client.search_model_versions(f"name='{name}'"))
    # the project's plan again (the test before left an impossible ratio)
    default = yaml.safe_load((ROOT / "params.yaml").read_text())["prune"]
    set_params(
        project,
        prune={"ratio": 0.2, "max_layer_ratio": default["max_layer_ratio"]},
        finetune={"max_steps": 3},
    )
    try:
        with pytest.raises(
            Exception, match="stage finetune ran past its timeout of 1 s"
        ):
            run_flow(project, stage_timeouts={"finetune": 1.0})
    finally:
        set_params(project, finetune={"max_steps": 2})
    assert tree_hash(project / "models/finetuned") == finetuned_before
    assert (project / "dvc.lock").read_text() == lock_before
    assert len(client.search_model_versions(f"name='{name}'")) == versions_before
    # DVC killed at any point (even mid-write of its lock table) leaves a
    # project the next DVC command can read
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0, status.stderr
    # this project's stage only: a pipeline run elsewhere on the machine may
    # have a finetune stage of its own
    leftover = [
        p.pid
        for p in psutil.process_iter(["cmdline", "cwd"])
        if "stages.finetune" in " ".join(p.info["cmdline"] or [])
        and p.info["cwd"] == str(project.resolve())
    ]
    assert leftover == []


def test_ratio_change_reruns_from_ranking_and_failing_gate_keeps_champion(project):
    set_params(
        project,
        prune={"ratio": 0.25, "max_layer_ratio": 0.9},
        gates={"min_decode_speedup": 1000.0},
    )
    state = run_flow(project, return_state=True)
    # a named final state in the Prefect UI; the summary is still the result
    assert state.name == "NotPromoted" and "decode_speedup" in state.message
    summary = state.result()
    ran = set(summary["stages_ran"])
    assert {
        "ranking",
        "prune",
        "finetune",
        "evaluate@finetuned",
        "bench@finetuned",
    } <= ran
    assert not ran & {
        "assets",
        "calibration",
        "importance",
        "teacher-text",
        "evaluate-dense",
    }
    assert summary["version"] == "2" and summary["promoted"] is False
    client, name = registry(project)
    version = client.get_model_version(name, "2")
    assert version.tags["gate.decode_speedup.verdict"] == "fail"
    assert version.tags["gates"] == "fail"
    assert client.get_registered_model(name).aliases == {
        "candidate": 2,
        "champion": 1,
    }
    # the gate table as a Prefect artifact; each stage's task named after it
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(flow_run_filter=flow_run)
        names = {t.name for t in prefect.read_task_runs(flow_run_filter=flow_run)}
    table = next(a for a in artifacts if a.key == "gates")
    assert "| decode_speedup | FAIL |" in table.data
    assert {"ranking", "prune", "finetune"} <= names


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
    assert deployment.parameters["profile"] == "nightly"
    assert deployment.concurrency_limit == 1 or deployment.global_concurrency_limit
    # its runs send heartbeats; an automation crashes a run that stops sending them
    env = deployment.job_variables["env"]
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"
    from prefect.automations import Automation

    from flows.deploy import automation_name

    automation = Automation.read(name=automation_name(str(deployment.id)))
    assert automation.trigger.within.total_seconds() == 180
    assert "prefect.flow-run.NotPromoted" in automation.trigger.expect
    assert automation.actions[0].state.value == "CRASHED"
    deploy_nightly(project, cron="0 3 * * *", pool="saap-test-pool")  # idempotent
    again = Automation.read(name=automation_name(str(deployment.id)))
    assert again.id != automation.id
    with pytest.raises(ValueError, match="30 or more"):
        deploy_nightly(project, pool="saap-test-pool", heartbeat_s=5)
    # refused before anything changed: the schedule and automation stay
    assert [s.schedule.cron for s in read_deployment().schedules] == ["0 3 * * *"]
    assert Automation.read(name=automation_name(str(deployment.id))).id == again.id


# ------------------------------------------------------------ gate audit


@pytest.mark.parametrize(
    "gate, impossible",
    [
        ("accuracy_retention", {"min_accuracy_retention": 10.0}),
        ("ppl_ratio", {"max_ppl_ratio": 1e-6}),
        ("fidelity_kl", {"max_kl": 1e-12}),
        ("decode_speedup", {"min_decode_speedup": 1000.0}),
    ],
)
def test_each_gate_failing_alone_blocks_promotion(project, gate, impossible):
    from flows import tracking
    from saap.params import load_section

    client, name = registry(project)
    champion = client.get_registered_model(name).aliases["champion"]
    params = load_section(project / "params.yaml", "gates").model_copy(
        update={"min_decode_speedup": 0.0} | impossible
    )
    version = client.get_registered_model(name).aliases["candidate"]
    results, promoted = tracking.apply_gates(client, name, str(version), params)
    failed = [r.name for r in results if not r.passed]
    assert failed == [gate] and not promoted
    assert client.get_registered_model(name).aliases["champion"] == champion
    tags = client.get_model_version(name, str(version)).tags
    assert tags[f"gate.{gate}.verdict"] == "fail" and tags["gates"] == "fail"
    assert tags["gates.thresholds_source"] == "params.yaml"


def test_a_copy_of_the_champion_shows_no_regression(project):
    from flows import tracking
    from saap.params import load_section

    client, name = registry(project)
    champion = client.get_model_version_by_alias(name, "champion")
    copy = client.create_model_version(
        name, champion.source, run_id=champion.run_id, tags=dict(champion.tags)
    )
    params = load_section(project / "params.yaml", "gates")
    results, _ = tracking.apply_gates(client, name, copy.version, params)
    regression = {r.name: r for r in results}["no_regression"]
    assert regression.passed and regression.value == 0.0
    assert regression.lower == regression.upper == 0.0
    tags = client.get_model_version(name, copy.version).tags
    assert tags["gates.champion_compared"] == str(champion.version)


def test_champion_evaluated_otherwise_is_not_compared(project):
    from flows import tracking
    from saap.params import load_section

    client, name = registry(project)
    champion = client.get_model_version_by_alias(name, "champion")
    # a version whose evaluation used another config: the champion's files with
    # another eval-config hash, logged to a run of their own
    run = client.create_run(client.get_run(champion.run_id).info.experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, files in (
            ("eval", ["finetuned.json", "finetuned.documents.json"]),
            ("bench", ["finetuned.json", "dense.json"]),
        ):
            for file in files:
                data = json.loads((project / "metrics" / kind / file).read_text())
                if file.startswith("finetuned") and "eval_config_hash" in data:
                    data["eval_config_hash"] = "another-config"
                (Path(tmp) / file).write_text(json.dumps(data))
                client.log_artifact(run.info.run_id, str(Path(tmp) / file), kind)
    other = client.create_model_version(
        name, champion.source, run_id=run.info.run_id, tags={"variant": "finetuned"}
    )
    params = load_section(project / "params.yaml", "gates")
    results, promoted = tracking.apply_gates(client, name, other.version, params)
    by = {r.name: r for r in results}
    assert not promoted and not by["no_regression"].passed
    assert "another config" in by["no_regression"].detail
    # and its dense evaluation is missing: accuracy and perplexity fail closed
    assert not by["accuracy_retention"].passed and not by["ppl_ratio"].passed
    assert client.get_registered_model(name).aliases["champion"] == int(
        champion.version
    )


def test_promote_uses_recorded_thresholds_unless_told(project):
    from typer.testing import CliRunner

    from saap_cli import app

    client, name = registry(project)
    candidate = client.get_registered_model(name).aliases["candidate"]
    # params.yaml now has an impossible speed threshold; the recorded one is 0
    set_params(project, gates={"min_decode_speedup": 1000.0})
    runner = CliRunner()
    result = runner.invoke(app, ["promote", "1", "--project", str(project)])
    assert "thresholds: recorded" in result.output
    result = runner.invoke(
        app, ["promote", "1", "--project", str(project), "--use-params"]
    )
    assert "thresholds: params.yaml" in result.output and result.exit_code == 1
    assert "decode_speedup       FAIL" in result.output
    tags = client.get_model_version(name, "1").tags
    assert tags["gates.thresholds_source"] == "params.yaml"
    missing = runner.invoke(
        app, ["gates", "--version", "99", "--project", str(project)]
    )
    assert missing.exit_code == 2
    assert "has no version or alias '99'" in missing.output
    assert "Traceback" not in missing.output
    set_params(project, gates={"min_decode_speedup": 0.0})
    assert candidate


def test_a_version_left_ungated_is_gated_by_the_next_run(project):
    client, name = registry(project)
    latest = client.get_model_version_by_alias(name, "candidate")
    # a run that died between registering and gating: no verdict tags
    ungated = client.create_model_version(
        name,
        latest.source,
        run_id=latest.run_id,
        tags={"variant": "finetuned", "model_md5": "another-model"},
    )
    assert "gates" not in client.get_model_version(name, ungated.version).tags
    summary = run_flow(project)
    assert str(ungated.version) in summary["gated_earlier_versions"]
    assert client.get_model_version(name, ungated.version).tags["gates"] in (
        "pass",
        "fail",
    )


def test_status_names_stale_stages_versions_last_and_next_run(project):
    from typer.testing import CliRunner

    from saap_cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["status", "--project", str(project)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "stale stages: none"
    assert any(line.startswith("candidate: saap-") for line in lines)
    assert any(line.startswith("champion: saap-") for line in lines)
    assert any(line.startswith("last run: compress-") for line in lines)
    # the nightly deployment made earlier in this module, at 03:00
    assert any(
        line.startswith("next nightly run: 20") and "(cron 0 3 * * *)" in line
        for line in lines
    )
    before = (project / "params.yaml").read_bytes()
    set_params(project, prune={"ratio": 0.3})
    stale = runner.invoke(app, ["status", "--project", str(project)])
    assert "ranking" in stale.output.splitlines()[0]
    (project / "params.yaml").write_bytes(before)
