"""requirements.lock is what the project installs from (`uv pip install
--require-hashes`, uv itself pinned in infra/bootstrap.txt and installed by pip
in hash-checking mode): every entry pinned with a sha256, every dependency that
pyproject.toml declares locked at a version its specifier allows, and the
environment the tests run in is the locked one, complete (`pip check`)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
ENTRY = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+) \\\n"
    r"    --hash=sha256:(?P<sha>[0-9a-f]{64})$",
    re.M,
)

pytestmark = pytest.mark.unit


def locked() -> dict[str, str]:
    text = (ROOT / "requirements.lock").read_text()
    entries = {canonicalize_name(m["name"]): m["version"] for m in ENTRY.finditer(text)}
    body = [
        line for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    # two lines per entry: nothing in the file escapes the pattern
    assert len(body) == 2 * len(entries), "an entry without a pinned sha256"
    return entries


def declared() -> list[Requirement]:
    """What infra/lock.py locks: pyproject.toml's dependencies and extras."""
    spec = importlib.util.spec_from_file_location("lock", ROOT / "infra" / "lock.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    return [Requirement(r) for r in lock.declared()]


def test_every_entry_is_pinned_with_a_hash():
    entries = locked()
    assert len(entries) > 100
    assert "saap" not in entries, "the project itself is installed from source"
    assert entries["torch"].startswith("2.13.0"), "the CPU build of torch 2.13.0"


def test_every_declared_dependency_is_locked_within_its_specifier():
    entries = locked()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{name} is declared but not in requirements.lock"
        version = Version(entries[name])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} is locked but pyproject.toml asks {requirement}; "
            "run `make lock`"
        )
        for extra in requirement.extras:  # psycopg[binary], moto[server]
            for sub in importlib.metadata.requires(requirement.name) or []:
                sub = Requirement(sub)
                if sub.marker and sub.marker.evaluate({"extra": extra}):
                    if not sub.marker.evaluate({"extra": ""}):
                        assert canonicalize_name(sub.name) in entries, (
                            f"{requirement.name}[{extra}] needs {sub.name}, "
                            "not in requirements.lock"
                        )


def test_the_environment_is_the_locked_one_and_complete():
    entries = locked()
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions()
    }
    differ = {
        n: (v, installed.get(n)) for n, v in entries.items() if installed.get(n) != v
    }
    assert not differ, f"locked vs installed: {differ}; run `make install`"
    # complete: on a fresh install (CI) the environment is the lock plus the
    # project, so pip finding every requirement satisfied means the lock has them
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_installer_is_pinned_with_a_hash():
    text = (ROOT / "infra" / "bootstrap.txt").read_text()
    entries = list(ENTRY.finditer(text))
    assert [m["name"] for m in entries] == ["uv"]
    assert importlib.metadata.version("uv") == entries[0]["version"]


def _tampered(tmp_path: Path) -> tuple[Path, str]:
    """A requirements file with the lock's entry for six, one hex digit of its
    sha256 changed; and the real sha256."""
    text = (ROOT / "requirements.lock").read_text()
    match = next(m for m in ENTRY.finditer(text) if m["name"] == "six")
    sha = match["sha"]
    wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
    requirements = tmp_path / "tampered.txt"
    requirements.write_text(f"six=={match['version']} --hash=sha256:{wrong}\n")
    return requirements, sha


@pytest.mark.integration
def test_a_download_that_does_not_match_its_locked_hash_is_refused(tmp_path):
    """uv in hash-checking mode, as `make install` runs it, refuses a file whose
    sha256 is not the locked one and installs nothing; so does pip, which
    installs uv itself."""
    requirements, sha = _tampered(tmp_path)
    uv = Path(sys.executable).with_name("uv")
    result = subprocess.run(
        [
            str(uv),
            "pip",
            "install",
            "--python",
            sys.executable,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--target",
            str(tmp_path / "uv-out"),
            "--require-hashes",
            "--no-deps",
            "-r",
            str(requirements),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Hash mismatch" in result.stderr + result.stdout
    assert sha in result.stderr + result.stdout  # uv names the file's real hash
    assert not list((tmp_path / "uv-out").glob("six*"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--require-hashes",
            "--no-deps",
            "-d",
            str(tmp_path / "out"),
            "-r",
            str(requirements),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "DO NOT MATCH THE HASHES" in result.stderr + result.stdout
    assert sha in result.stderr + result.stdout  # pip names the file's real hash
    assert not list((tmp_path / "out").glob("*"))
