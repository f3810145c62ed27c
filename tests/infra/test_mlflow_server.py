"""A real ``mlflow server`` on loopback: the project's registry code over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--serve-artifacts",
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("mlflow server did not start within 90 s")
    yield url
    process.terminate()
    process.wait(timeout=20)


def test_register_and_alias_through_http(
    mlflow_server, tmp_path, monkeypatch, tiny_model_dir
):
    import shutil

    from flows import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "models" / "pruned")
    for variant, ppl in (("pruned", 12.0), ("dense", 10.0)):
        for folder, name, content in (
            ("eval", f"{variant}.json", {"perplexity": {"ptb": ppl}, "zero_shot": {}}),
            ("eval", f"{variant}.documents.json", {}),
            ("bench", f"{variant}.json", {}),
        ):
            path = project / "metrics" / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content))
    client = tracking.client_for(project)
    run = client.create_run(tracking.experiment_id(client, project))
    version = tracking.register_version(
        client, run.info.run_id, project, "saap-tiny", "pruned", {"variant": "pruned"}
    )
    assert str(version.version) == "1"
    aliases = client.get_registered_model("saap-tiny").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1"}
    files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/MLmodel", "model/artifacts"} <= files
    # the registered version is an MLflow model that MLflow alone loads
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model("models:/saap-tiny@candidate")
    assert isinstance(model.predict(["the"], params={"max_new_tokens": 2})[0], str)
    client.set_model_version_tag("saap-tiny", "1", "gate.ppl_ratio.verdict", "pass")
    assert (
        client.get_model_version("saap-tiny", "1").tags["gate.ppl_ratio.verdict"]
        == "pass"
    )


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    from flows import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(
        tracking.RegistryError, match="unreachable.*unset MLFLOW_TRACKING_URI"
    ):
        tracking.client_for(tmp_path)
    assert time.monotonic() - started < 30
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in os.environ
