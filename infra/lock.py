"""Write requirements.lock: every distribution of the project's environment pinned
to one version with the sha256 of the very file pip installs, so that
``pip install --require-hashes`` checks each download before any code from it
runs (a wheel is unpacked, an sdist built, only after its hash matched).

The lock is of one platform (CPython 3.11, Linux x86-64, the CPU build of torch
that lies on this machine's disk under pip's find-links). Regenerate it after a
change of pyproject.toml's dependencies, or for another platform::

    make lock          # a throwaway venv, resolved from pyproject.toml

which runs ``python infra/lock.py --resolve``. The resolution itself installs
unverified (that is the act of choosing what to trust, as pip-compile's is); every
install after it, `make run`, `make test` and CI, verifies against the lock.

How hashes are found: ``pip install --dry-run --report`` of the pinned set says
which file pip would take for each distribution and, from the index, its sha256;
where the index gives none (a local find-links file), the file is hashed here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PROJECT = "saap"
EXTRAS = "dev,services"
TORCH = "torch==2.13.0"
BUILD_REQUIRES = "setuptools>=70.1"  # pyproject.toml's build-system
HEADER = """\
# requirements.lock: written by `make lock` (python infra/lock.py --resolve).
# Every distribution of the project's environment (extras: {extras}) at one
# version, with the sha256 of the file pip installs; `pip install
# --require-hashes --no-deps -r requirements.lock` checks each download before
# any code from it runs. Platform: {platform}.
"""


def _run(command: list[str], **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command[:6])} ... failed (exit {result.returncode}):\n"
            + (result.stdout + result.stderr)[-3000:]
        )
    return result.stdout


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sha256_of(url: str) -> str:
    digest = hashlib.sha256()
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        with open(urllib.request.url2pathname(parsed.path), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    else:
        with urllib.request.urlopen(url, timeout=300) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def frozen(python: str) -> list[str]:
    """The environment's distributions as name==version (pip, setuptools and
    wheel included: the editable install builds with them), the project itself
    left out."""
    lines = _run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"])
    pins = []
    for line in lines.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "==" not in line:
            continue
        if _canonical(line.split("==")[0]) == PROJECT:
            continue
        pins.append(line)
    return sorted(pins, key=str.lower)


def hashed(python: str, pins: list[str]) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of the file pip would install for each pin."""
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "pins.txt"
        requirements.write_text("\n".join(pins) + "\n")
        report = Path(tmp) / "report.json"
        _run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--no-deps",
                "-q",
                "--report",
                str(report),
                "-r",
                str(requirements),
            ]
        )
        items = json.loads(report.read_text())["install"]
    rows = []
    for item in items:
        meta, info = item["metadata"], item["download_info"]
        archive = info.get("archive_info", {})
        digest = archive.get("hashes", {}).get("sha256")
        if digest is None and archive.get("hash", "").startswith("sha256="):
            digest = archive["hash"].split("=", 1)[1]
        if digest is None:
            digest = _sha256_of(info["url"])
        rows.append((meta["name"], meta["version"], digest))
    missing = {_canonical(p.split("==")[0]) for p in pins} - {
        _canonical(n) for n, _, _ in rows
    }
    if missing:
        raise SystemExit(f"pip's report lacks {sorted(missing)}; nothing written")
    return sorted(rows, key=lambda r: r[0].lower())


def render(rows: list[tuple[str, str, str]]) -> str:
    platform = (
        f"CPython {sys.version_info.major}.{sys.version_info.minor}, "
        f"{sys.platform} {os.uname().machine}"
    )
    lines = [HEADER.format(extras=EXTRAS, platform=platform)]
    for name, version, digest in rows:
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{digest}")
    return "\n".join(lines) + "\n"


def resolve(base_python: str) -> str:
    """A throwaway venv with the project installed the unverified way; its
    python."""
    venv = Path(tempfile.mkdtemp(prefix="saap-lock-")) / "venv"
    _run([base_python, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", TORCH])
    # the project's requirements, not the project (building it would write
    # build/ into the source tree); setuptools for the editable install after
    _run([python, "-m", "pip", "install", "-q", *declared(), BUILD_REQUIRES])
    return python


def declared() -> list[str]:
    """pyproject.toml's dependencies and those of the locked extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS.split(","):
        requirements += project["optional-dependencies"][extra]
    return requirements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python",
        default=str(ROOT / ".venv" / "bin" / "python"),
        help="lock this interpreter's environment (default: the project's .venv)",
    )
    parser.add_argument(
        "--resolve",
        action="store_true",
        help="resolve pyproject.toml afresh in a throwaway venv and lock that",
    )
    parser.add_argument("--out", type=Path, default=LOCK)
    args = parser.parse_args()
    python = resolve(sys.executable) if args.resolve else args.python
    rows = hashed(python, frozen(python))
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.write_text(render(rows))
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(rows)} distributions")


if __name__ == "__main__":
    main()
