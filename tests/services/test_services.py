"""The team-scale path end to end on real services (tests/services/servers.py):
`saap deploy` creates the nightly deployment on a Prefect server backed by
PostgreSQL; a Prefect worker executes the compress flow (tiny fixture) which logs
to an `mlflow server` (PostgreSQL store, S3 artifacts), registers and gates a
pyfunc model; DVC pushes to and pulls from the S3 remote; an overlapping run is
refused; a worker killed mid-stage leaves outputs, registry and champion as they
were, and the next run completes."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.flows.flowkit import copy_project, init_repo, set_params, tiny_settings

pytestmark = [pytest.mark.services, pytest.mark.integration]

POOL = "saap-services-test"
FLOW_TIMEOUT_S = 900


def tree_hash(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def project(services, tmp_path_factory, tiny_model_dir, text_dir, eval_dir):
    root = tmp_path_factory.mktemp("project")
    copy_project(root, tiny_model_dir, text_dir, eval_dir)
    tiny_settings(root)
    init_repo(root)
    return root


def deploy(services, project: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "saap_cli", "deploy", "--project", str(project),
         "--pool", POOL, "--profile", "quick", "--heartbeat-s", "30"],
        env=services.env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compress/nightly" in result.stdout


def trigger(**parameters):
    """A run of the deployment, scheduled now (a worker picks it up)."""
    from prefect.deployments import run_deployment

    return run_deployment("compress/nightly", parameters=parameters, timeout=0)


def start_worker(services, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
         "--run-once", "--type", "process"],
        env=services.env(), stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def flow_run(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def wait_final(run_id, worker: subprocess.Popen, log: Path):
    deadline = time.monotonic() + FLOW_TIMEOUT_S
    while time.monotonic() < deadline:
        state = flow_run(run_id).state
        if state is not None and state.is_final():
            worker.wait(timeout=120)
            return state
        if worker.poll() is not None and not flow_run(run_id).state.is_final():
            time.sleep(2)  # the state may land just after the worker exits
            state = flow_run(run_id).state
            if not state.is_final():
                pytest.fail(
                    f"worker exited, run {state.name}: {log.read_text()[-3000:]}"
                )
        time.sleep(2)
    worker.kill()
    pytest.fail(
        f"flow run not final after {FLOW_TIMEOUT_S} s: {log.read_text()[-3000:]}"
    )


def registry(services, project: Path):
    from mlflow import MlflowClient

    client = MlflowClient(services.mlflow_url, services.mlflow_url)
    base = json.loads((project / "models/base/saap.json").read_text())["name"]
    return client, f"saap-{base}"


def test_worker_runs_the_nightly_deployment(services, project, tmp_path):
    deploy(services, project)
    run = trigger()
    log = tmp_path / "worker.log"
    state = wait_final(run.id, start_worker(services, log), log)
    assert state.is_completed(), (
        f"{state.name}: {state.message}\n{log.read_text()[-3000:]}"
    )
    client, name = registry(services, project)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1"
    assert champion.tags["gates"] == "pass"
    assert "| gate | verdict |" in champion.description
    assert champion.tags["eval_config_hash"] not in ("", "None")
    assert any(key.startswith("data.") for key in champion.tags)
    run_tags = client.get_run(champion.run_id).data.tags
    assert "mlflow.source.git.commit" in run_tags or run_tags["git.revision"] == "none"
    assert any(key.startswith("dvc.") for key in run_tags)
    # the registry's rows live in PostgreSQL, the model files in S3
    import psycopg

    with psycopg.connect(services.postgres.url("mlflow")) as conn:
        rows = conn.execute("select name, version from model_versions").fetchall()
    assert (name, 1) in rows
    with psycopg.connect(services.postgres.url("prefect")) as conn:
        states = conn.execute("select state_type from flow_run").fetchall()
    assert ("COMPLETED",) in states
    keys = services.keys("mlflow")
    assert any(k.endswith("model/MLmodel") for k in keys), keys[:20]
    assert any(
        k.endswith("/model/artifacts/checkpoint/model.safetensors") for k in keys
    )
    assert any(k.endswith("/model/artifacts/checkpoint/README.md") for k in keys)
    # the champion is an MLflow model: MLflow alone loads it and generates text
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    text = model.predict(["the model"], params={"max_new_tokens": 4})
    assert len(text) == 1 and isinstance(text[0], str)


def test_dvc_push_and_pull_through_s3(services, project):
    dvc = [sys.executable, "-m", "dvc"]
    env = services.env()
    for args in (
        ["remote", "add", "-f", "-d", "team", "s3://dvc/saap"],
        ["remote", "modify", "team", "endpointurl", services.s3_url],
        ["push", "-q"],
    ):
        subprocess.run([*dvc, *args], cwd=project, env=env, check=True, timeout=600)
    assert any(k.startswith("saap/files/md5/") for k in services.keys("dvc"))
    before = tree_hash(project / "models/finetuned")
    shutil.rmtree(project / "models/finetuned")
    shutil.rmtree(project / ".dvc/cache")
    subprocess.run(
        [*dvc, "pull", "-q", "models/finetuned"], cwd=project, env=env, check=True,
        timeout=600,
    )  # fmt: skip
    assert tree_hash(project / "models/finetuned") == before


def test_an_overlapping_run_is_refused(services, project, tmp_path):
    from flows.stagerun import project_lock

    client, name = registry(services, project)
    versions = len(client.search_model_versions(f"name='{name}'"))
    log = tmp_path / "worker.log"
    with project_lock(project, timeout_s=5):
        run = trigger(lock_timeout_s=2)
        state = wait_final(run.id, start_worker(services, log), log)
    assert state.is_failed(), state.name
    assert "another compress run" in log.read_text()
    assert len(client.search_model_versions(f"name='{name}'")) == versions


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the worker and every process it started (the flow run, the stage
    command), as a machine that dies would; wait until they are reaped."""
    parent = psutil.Process(process.pid)
    family = [*parent.children(recursive=True), parent]
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.kill()
    process.wait(timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # until reaped (DVC's lock file names the dead pids, and a zombie
        # still counts as running for it)
        alive = [m.pid for m in family if psutil.pid_exists(m.pid)]
        if not alive:
            return
        time.sleep(0.2)
    pytest.fail(f"processes still alive after SIGKILL: {alive}")


def stage_command_running(worker: subprocess.Popen, module: str) -> bool:
    """Whether DVC has started the stage's command (``python -m <module>``)
    under the worker: by then DVC has done whatever it does to old outputs."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(worker.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if module in " ".join(child.cmdline()):
                    return True
    return False


def running_task(run_id) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    running = [t.name for t in tasks if t.state is not None and t.state.is_running()]
    return running[0] if running else None


def test_killed_worker_leaves_everything_then_next_run_completes(
    services, project, tmp_path
):
    client, name = registry(services, project)
    versions = len(client.search_model_versions(f"name='{name}'"))
    champion = client.get_model_version_by_alias(name, "champion").version
    finetuned = tree_hash(project / "models/finetuned")
    finetune_lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"][
        "finetune"
    ]
    # a new ratio: ranking, prune, finetune... re-run; the worker dies in finetune
    set_params(project, prune={"ratio": 0.25})
    log = tmp_path / "worker-killed.log"
    run = trigger()
    worker = start_worker(services, log)
    deadline = time.monotonic() + FLOW_TIMEOUT_S
    while not stage_command_running(worker, "stages.finetune"):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        assert worker.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    assert running_task(run.id).startswith("finetune")
    kill_tree(worker)
    # the interrupted stage's output and lock entry are as they were; the stages
    # that finished before it are committed (outputs match dvc.lock)
    assert tree_hash(project / "models/finetuned") == finetuned
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock["finetune"] == finetune_lock
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert "finetune" in status
    assert not {"ranking", "prune"} & set(status), status
    assert len(client.search_model_versions(f"name='{name}'")) == versions
    assert client.get_model_version_by_alias(name, "champion").version == champion
    # the deployment's automation sets the silent run Crashed (3 missed
    # heartbeats of 30 s), which frees the deployment's concurrency slot
    killed_at = time.monotonic()
    while not (state := flow_run(run.id).state).is_final():
        assert time.monotonic() - killed_at < 240, f"still {state.name}"
        time.sleep(5)
    assert state.is_crashed(), state.name
    assert "no heartbeat" in (state.message or "")
    print(f"marked Crashed {time.monotonic() - killed_at:.0f} s after the kill")
    log = tmp_path / "worker-next.log"
    state = wait_final(trigger().id, start_worker(services, log), log)
    assert state.is_completed(), f"{state.name}: {log.read_text()[-3000:]}"
    assert len(client.search_model_versions(f"name='{name}'")) == versions + 1
    plan = json.loads((project / "artifacts/plan/plan.json").read_text())
    assert plan["ratio_requested"] == pytest.approx(0.25)


def _status(url: str, login: tuple[str, str] | None = None) -> int:
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if login:
        token = base64.b64encode(":".join(login).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


LOG_A_RUN = """
import pathlib, mlflow
mlflow.set_experiment("compose")
with mlflow.start_run() as run:
    mlflow.log_param("from", "infra/mlflow-server.sh")
    pathlib.Path("note.txt").write_text("logged through basic auth")
    mlflow.log_artifact("note.txt")
print(run.info.run_id)
"""


def test_the_compose_mlflow_server_needs_a_login(services, tmp_path):
    """infra/mlflow-server.sh, the command of the compose file's `mlflow`
    service, on the services' PostgreSQL and S3: anonymous and wrong logins are
    refused (401), the admin gets in, and a client logged in through
    MLFLOW_TRACKING_USERNAME/PASSWORD logs a run whose artifact lands in S3."""
    import secrets

    from tests.services.servers import free_port, start, stop, wait_http

    for database in ("mlflow_compose", "mlflow_compose_auth"):
        services.postgres.create_database(database)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    password = "admin-" + secrets.token_hex(8)
    env = services.env(
        MLFLOW_BACKEND_STORE_URI=services.postgres.url("mlflow_compose"),
        MLFLOW_AUTH_DATABASE_URI=services.postgres.url("mlflow_compose_auth"),
        MLFLOW_ARTIFACTS_DESTINATION="s3://mlflow/compose",
        MLFLOW_AUTH_ADMIN_USERNAME="admin",
        MLFLOW_AUTH_ADMIN_PASSWORD=password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
    )
    log = tmp_path / "mlflow-compose.log"
    root = Path(__file__).resolve().parents[2]
    process = start(["sh", str(root / "infra/mlflow-server.sh")], log, env=env)
    try:
        wait_http(f"{url}/health", process, "infra/mlflow-server.sh", log)
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(search) == 401
        assert _status(search, ("admin", "not-the-password")) == 401
        assert _status(search, ("admin", password)) == 200
        client_env = dict(
            env,
            MLFLOW_TRACKING_URI=url,
            MLFLOW_TRACKING_USERNAME="admin",
            MLFLOW_TRACKING_PASSWORD=password,
        )
        result = subprocess.run(
            [sys.executable, "-c", LOG_A_RUN],
            env=client_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        run_id = result.stdout.strip().splitlines()[-1]
        keys = services.keys("mlflow", "compose/")
        assert any(k.endswith(f"{run_id}/artifacts/note.txt") for k in keys), keys
        anonymous = subprocess.run(
            [sys.executable, "-c", LOG_A_RUN],
            env=dict(env, MLFLOW_TRACKING_URI=url),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert anonymous.returncode != 0
        assert "401" in anonymous.stderr or "Unauthorized" in anonymous.stderr
    finally:
        stop(process)
