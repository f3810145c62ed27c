"""The compare flow's code revision names content (code and params), not a
commit: a docs-only commit keeps it, so a comparison run continues across
checkouts; any change to the code or to params outside the arm's own method and
ratio changes it."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from flows.compare import code_revision, commit_of


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def _commit(root, message):
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "saap").mkdir()
    (tmp_path / "saap" / "prune.py").write_text("RATIO = 0.2\n")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "prune.py").write_text("print('prune')\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("# results\n")
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    params = {"compare": {"method": "saap", "ratio": 0.2, "seeds": [0, 1]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _git(tmp_path, "init", "-q")
    _commit(tmp_path, "project")
    return tmp_path


def test_a_docs_commit_keeps_the_revision_a_code_change_does_not(repo):
    first = code_revision(repo)
    assert first.startswith("code-")
    head = commit_of(repo)
    (repo / "docs" / "results.md").write_text("# results, rendered\n")
    _commit(repo, "docs")
    assert commit_of(repo) != head
    assert code_revision(repo) == first

    (repo / "saap" / "prune.py").write_text("RATIO = 0.5\n")
    changed = code_revision(repo)
    assert changed != first
    # the same content committed is the same revision
    _commit(repo, "code")
    assert code_revision(repo) == changed
    # back to the first content: the first revision again
    (repo / "saap" / "prune.py").write_text("RATIO = 0.2\n")
    assert code_revision(repo) == first


def test_untracked_code_counts_ignored_caches_do_not(repo):
    first = code_revision(repo)
    (repo / "saap" / "__pycache__").mkdir()
    (repo / "saap" / "__pycache__" / "prune.cpython-311.pyc").write_bytes(b"\0")
    assert code_revision(repo) == first
    (repo / "stages" / "new_stage.py").write_text("x = 1\n")
    assert code_revision(repo) != first


def test_params_count_except_the_arms_own_method_and_ratio(repo):
    first = code_revision(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["compare"].update(method="flap", ratio=0.5)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert code_revision(repo) == first
    params["compare"]["seeds"] = [0, 1, 2]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert code_revision(repo) != first


def test_outside_a_checkout_it_hashes_the_files(tmp_path):
    (tmp_path / "saap").mkdir()
    (tmp_path / "saap" / "prune.py").write_text("RATIO = 0.2\n")
    (tmp_path / "params.yaml").write_text("compare: {seeds: [0]}\n")
    first = code_revision(tmp_path)
    assert commit_of(tmp_path) == "no-git"
    (tmp_path / "saap" / "prune.py").write_text("RATIO = 0.5\n")
    assert code_revision(tmp_path) != first
