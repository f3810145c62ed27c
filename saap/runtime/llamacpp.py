"""llama.cpp, pinned: fetched, verified, built once per machine, and run.

The source is the llama.cpp tree vendored in the ``llama-cpp-python`` sdist on PyPI,
downloaded by URL from the package index (no build backend of the sdist runs) and
checked against its pinned sha256 before it is unpacked. Only the tools the
pipeline calls are built, with cmake, ``GGML_NATIVE=OFF`` and the x86 ISA flags the
CPU reports (a native build was seen to die with "illegal instruction" on a machine
of this kind). Binaries are cached outside the repository under
``<cache>/llama.cpp/<key>/bin``, the key hashing the source sha256, the flags and
the compiler, so a machine builds once; ``build.json`` beside them records the
flags and the build time. A file lock serialises builders: a process that needs
the tools while another builds them (``make llamacpp`` and a stage, or two test
processes) waits for that build instead of starting its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from saap.errors import LlamaCppError, SourceError
from saap.sources import PACKAGES, default_cache_dir, fetch_package

log = logging.getLogger(__name__)

SDIST = "llama-cpp-python"
VENDORED = "vendor/llama.cpp"
# the tools the pipeline runs; llama-results writes a prompt's logits to a GGUF file
TOOLS = (
    "llama-quantize",
    "llama-bench",
    "llama-perplexity",
    "llama-completion",
    "llama-results",
)
# /proc/cpuinfo flag -> ggml cmake option, for x86-64
X86_FLAGS = {
    "sse4_2": "GGML_SSE42",
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "bmi2": "GGML_BMI2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512_vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}
# ggml's AMX kernels stay off even where the CPU reports AMX: on a 2-core Xeon
# VM that lists amx_tile / amx_int8 / amx_bf16, a build with them died with
# "Illegal instruction" on every q8_0 and q4_0 model (f16 ran), since the tiles
# also need the hypervisor's and kernel's consent, which the flags do not show
AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (first ``flags`` line of /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def isa_options(flags: set[str], machine: str | None = None) -> dict[str, str]:
    """cmake ``-D`` options: native off, each x86 ISA extension on only where the
    CPU reports it; other architectures keep ggml's portable defaults."""
    options = {"GGML_NATIVE": "OFF"}
    if (machine or platform.machine()) in ("x86_64", "AMD64"):
        for flag, option in X86_FLAGS.items():
            options[option] = "ON" if flag in flags else "OFF"
        options.update(dict.fromkeys(AMX_OPTIONS, "OFF"))
    return options


# build.json fields that describe the build run, not the build
BUILD_FACTS = ("build_seconds", "jobs", "generator")
BASE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "LLAMA_CURL": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_BUILD_APP": "OFF",
}


def _compiler() -> str:
    for name in ("c++", "g++", "clang++"):
        if path := shutil.which(name):
            out = subprocess.run(
                [path, "--version"], capture_output=True, text=True, check=False
            )
            return out.stdout.splitlines()[0] if out.stdout else path
    return ""


def check_toolchain() -> None:
    """One clear error naming what to install when cmake or a compiler is missing."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    if not _compiler():
        missing.append("a C++ compiler (g++ or clang++)")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        missing.append("a C compiler (gcc)")
    if missing:
        raise LlamaCppError(
            "building llama.cpp needs " + " and ".join(missing) + "; install them "
            "(Debian/Ubuntu: apt-get install cmake g++) and run again"
        )


@dataclass(frozen=True)
class LlamaCpp:
    """Paths of a built llama.cpp: ``bin/<tool>`` and the source tree."""

    root: Path
    source: Path
    info: dict

    @property
    def record(self) -> dict:
        """What the build is (source, flags, compiler, tools), without the facts of
        the machine that built it (build time, jobs): outputs that record it are
        the same wherever they are written."""
        return {k: v for k, v in self.info.items() if k not in BUILD_FACTS}

    def tool(self, name: str) -> Path:
        path = self.root / "bin" / name
        if not path.is_file():
            raise LlamaCppError(f"{path} is missing; delete {self.root} to rebuild")
        return path

    def run(
        self, name: str, args: list[str], timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """Run a tool; a non-zero exit raises with llama.cpp's own last lines."""
        command = [str(self.tool(name)), *args]
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=timeout
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
            raise LlamaCppError(
                f"{name} failed (exit {result.returncode}): " + "\n".join(tail)
            )
        return result


def source_sha256() -> str:
    return PACKAGES[SDIST].sha256


# Targets compiled without optimisation, none of which does timed or numeric
# work: llama-common (argument parsing, chat templates, JSON, sampling helpers:
# 146 s of the 5.8-min build on 2 cores at -O3, 100 s at -O0, its 51 objects
# alone, ninja -j2), the vendored HTTP client it links (httplib.cpp 21.3 s ->
# 9.8 s), llama-bench's and llama-completion's own sources (argument parsing,
# output; 12.6 s -> 5.7 s and 5.3 s -> 2.7 s). llama-bench times llama_decode,
# which is libllama and ggml, both at -O3: f16 decode with the -O0 llama-bench
# 1.04x [0.97, 1.10] of the -O3 one, prefill 1.01x [0.91, 1.12] (4 interleaved
# rounds, not separated). llama-quantize's conversions (ggml) and
# llama-perplexity's scoring loop (its own source) stay at -O3.
UNOPTIMISED_TARGETS = (
    "llama-common",
    "cpp-httplib",
    "llama-bench-impl",
    "llama-completion-impl",
)
# libllama sources no pipeline tool runs on a LLaMA model: grammars and
# samplers (llama-completion samples greedily, untimed), chat templates, LoRA and
# control-vector adapters, the model saver, and the KV-cache / memory kinds of
# other architectures (sliding-window, DSA, MSA, DeepSeek-V4, hybrid, recurrent).
# About 46 CPU-s of libllama's 174 at -O3; llama-kv-cache.cpp, llama-graph.cpp,
# llama-context.cpp, the model files and ggml (what llama_decode runs) stay -O3.
UNOPTIMISED_SOURCES = {
    "src": (
        "llama-grammar.cpp",
        "llama-sampler.cpp",
        "llama-chat.cpp",
        "llama-adapter.cpp",
        "llama-model-saver.cpp",
        "llama-kv-cache-iswa.cpp",
        "llama-kv-cache-dsa.cpp",
        "llama-kv-cache-dsa-iswa.cpp",
        "llama-kv-cache-msa.cpp",
        "llama-kv-cache-dsv4.cpp",
        "llama-memory-hybrid.cpp",
        "llama-memory-hybrid-iswa.cpp",
        "llama-memory-hybrid-idx.cpp",
        "llama-memory-recurrent.cpp",
    ),
}
# Targets compiled as unity builds (their sources concatenated into a few
# translation units): llama-common's 50 files each parse the same large headers
# (nlohmann JSON, the chat and argument code), so at -O0 the parsing is most of
# its time: 155 CPU-s -> 69 CPU-s. json.cpp specialises a template after the
# other files have instantiated it, so it stays a file of its own.
UNITY_TARGETS = ("llama-common",)
UNITY_EXCLUDED = {"common": ("json.cpp",)}

# included at each project() call of llama.cpp's CMake build
# (CMAKE_PROJECT_INCLUDE); the call runs once the top directory is processed,
# when every target exists, and its -O0 comes after the Release -O3
_PROJECT_INCLUDE = """\
if(CMAKE_CURRENT_SOURCE_DIR STREQUAL CMAKE_SOURCE_DIR AND NOT SAAP_DEFERRED)
  set(SAAP_DEFERRED ON)
{calls}endif()
"""
# one literal call per target: a deferred call's ${...} would be read when it
# runs, after a loop variable is gone
_DEFER_CALL = (
    "  cmake_language(DEFER CALL set_property TARGET {target} "
    "APPEND PROPERTY COMPILE_OPTIONS -O0)\n"
)
_DEFER_UNITY = (
    "  cmake_language(DEFER CALL set_property TARGET {target} "
    "PROPERTY UNITY_BUILD ON)\n"
)
# source properties belong to the directory that defines the target
_DEFER_SOURCES = (
    "  cmake_language(DEFER CALL set_source_files_properties {files} "
    "DIRECTORY ${{CMAKE_SOURCE_DIR}}/{folder} PROPERTIES {properties})\n"
)


def _source_calls(groups: dict[str, tuple[str, ...]], properties: str) -> str:
    return "".join(
        _DEFER_SOURCES.format(
            files=" ".join(f"${{CMAKE_SOURCE_DIR}}/{folder}/{name}" for name in names),
            folder=folder,
            properties=properties,
        )
        for folder, names in groups.items()
    )


def project_include(
    targets: tuple[str, ...] = UNOPTIMISED_TARGETS,
    sources: dict[str, tuple[str, ...]] | None = None,
    unity: tuple[str, ...] = UNITY_TARGETS,
    unity_excluded: dict[str, tuple[str, ...]] | None = None,
) -> str:
    """The CMake code that compiles ``targets`` and ``sources`` (folder -> file
    names, relative to the source tree) at -O0 and ``unity`` as unity builds,
    less ``unity_excluded``."""
    sources = UNOPTIMISED_SOURCES if sources is None else sources
    unity_excluded = UNITY_EXCLUDED if unity_excluded is None else unity_excluded
    calls = "".join(_DEFER_CALL.format(target=t) for t in targets)
    calls += _source_calls(sources, "COMPILE_OPTIONS -O0")
    calls += "".join(_DEFER_UNITY.format(target=t) for t in unity)
    calls += _source_calls(unity_excluded, "SKIP_UNITY_BUILD_INCLUSION ON")
    return _PROJECT_INCLUDE.format(calls=calls)


def _build_shape() -> dict:
    """What the build compiles differently from llama.cpp's Release defaults
    (part of the cache key, recorded in build.json)."""
    return {
        "unoptimised": list(UNOPTIMISED_TARGETS),
        "unoptimised_sources": {k: list(v) for k, v in UNOPTIMISED_SOURCES.items()},
        "unity": list(UNITY_TARGETS),
        "unity_excluded": {k: list(v) for k, v in UNITY_EXCLUDED.items()},
    }


def build_key(options: dict[str, str], compiler: str) -> str:
    text = json.dumps(
        {
            "sha256": source_sha256(),
            "options": options,
            "compiler": compiler,
        }
        | _build_shape(),
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _extract(tf: tarfile.TarFile, members: list[tarfile.TarInfo], out: Path) -> None:
    """Extract ``members`` under ``out`` with tarfile's "data" filter (no paths
    outside ``out``, no device files, no setuid bits); on a Python without the
    extraction filters (3.11 before 3.11.4, e.g. Debian 12's 3.11.2) the same
    rules are checked here, and links are refused (the vendored tree has none)."""
    if hasattr(tarfile, "data_filter"):
        tf.extractall(out, members=members, filter="data")
        return
    root = out.resolve()
    for member in members:
        path = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()):
            raise SourceError(
                f"{member.name} in the llama.cpp source is a link or special file; "
                "extracting it needs Python 3.11.4 or later"
            )
        if path != root and root not in path.parents:
            raise SourceError(f"{member.name} would be extracted outside {root}")
        member.mode &= 0o755
    tf.extractall(out, members=members)


def unpack_source(cache: Path) -> Path:
    """The vendored llama.cpp tree, unpacked once from the verified sdist."""
    archive = fetch_package(SDIST, cache)  # sha256 checked before anything else
    root = archive.name.removesuffix(".tar.gz")
    target = cache / "llama.cpp" / f"src-{source_sha256()[:16]}"
    if (target / "CMakeLists.txt").is_file():
        return target
    prefix = f"{root}/{VENDORED}/"
    tmp = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
    try:
        with tarfile.open(archive) as tf:
            members = []
            for member in tf.getmembers():
                if not member.name.startswith(prefix):
                    continue
                member.name = member.name[len(prefix) :]
                members.append(member)
            if not members:
                raise SourceError(f"{archive} holds no {VENDORED}; is the pin right?")
            _extract(tf, members, tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _build_lock(cache: Path):
    """Hold ``<cache>/llama.cpp/.build.lock`` exclusively; log once while
    another process holds it."""
    path = cache / "llama.cpp" / ".build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building llama.cpp (%s); waiting", path)
            started = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("waited %.0f s for llama.cpp", time.perf_counter() - started)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _built(root: Path, cache: Path) -> LlamaCpp | None:
    info_file = root / "build.json"
    if info_file.is_file() and all((root / "bin" / t).is_file() for t in TOOLS):
        return LlamaCpp(root, unpack_source(cache), json.loads(info_file.read_text()))
    return None


def ensure_llamacpp(cache_dir: Path | None = None, jobs: int | None = None) -> LlamaCpp:
    """Build llama.cpp's tools once per machine (cached by source, flags and
    compiler) and return their paths; waits while another process builds them."""
    cache = cache_dir or default_cache_dir()
    options = BASE_OPTIONS | isa_options(cpu_flags())
    compiler = _compiler()
    key = build_key(options, compiler)
    root = cache / "llama.cpp" / f"build-{key}"
    built = _built(root, cache)
    if built is not None:
        return built
    with _build_lock(cache):
        # built by the process this one waited for
        built = _built(root, cache)
        if built is not None:
            return built
        return _build(cache, root, key, options, compiler, jobs)


def _build(
    cache: Path,
    root: Path,
    key: str,
    options: dict[str, str],
    compiler: str,
    jobs: int | None,
) -> LlamaCpp:
    check_toolchain()
    source = unpack_source(cache)
    work = root.with_name(root.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    build_dir = work / "build"
    include = work / "project-include.cmake"
    work.mkdir(parents=True)
    include.write_text(project_include())
    start = time.perf_counter()
    # Ninja where the machine has it (the same targets and flags; its log says
    # where the time goes: about 700 s of compiling, 42% of it llama-common)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        "cmake",
        *generator,
        "-S",
        str(source),
        "-B",
        str(build_dir),
        *(f"-D{k}={v}" for k, v in options.items()),
        f"-DCMAKE_PROJECT_INCLUDE={include}",
    ]
    jobs = jobs or os.cpu_count() or 1
    build = [
        "cmake",
        "--build",
        str(build_dir),
        "-j",
        str(jobs),
        "--target",
        *TOOLS,
    ]
    log.info("building llama.cpp (%s) once for this machine: %s", key, options)
    for command in (configure, build):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-20:]
            raise LlamaCppError(
                f"llama.cpp build step {command[:2]} failed (exit "
                f"{result.returncode}):\n" + "\n".join(tail)
            )
    seconds = time.perf_counter() - start
    (work / "bin").mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        shutil.copy2(build_dir / "bin" / tool, work / "bin" / tool)
    info = {
        "source": f"{PACKAGES[SDIST].requirement} ({VENDORED})",
        "source_sha256": source_sha256(),
        "options": options,
        **_build_shape(),
        "compiler": compiler,
        "cpu_flags": sorted(f for f in cpu_flags() if f in X86_FLAGS),
        "jobs": jobs,
        "generator": generator[1] if generator else "Unix Makefiles",
        "build_seconds": round(seconds, 1),
        "tools": list(TOOLS),
    }
    (work / "build.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(build_dir)
    include.unlink()
    if root.exists():
        shutil.rmtree(root)
    os.replace(work, root)
    log.info("built llama.cpp in %.0f s -> %s", seconds, root)
    return LlamaCpp(root, source, info)


# ------------------------------------------------------------------ running tools


def quantize(tools: LlamaCpp, source: Path, out: Path, kind: str, threads: int) -> str:
    """``llama-quantize`` f16 -> ``kind``; the file appears only when it succeeds.
    Returns llama-quantize's log (it names each tensor that fell back)."""
    partial = out.with_name(out.name + ".partial")
    try:
        result = tools.run(
            "llama-quantize", [str(source), str(partial), kind.upper(), str(threads)]
        )
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return result.stdout + result.stderr


_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def perplexity(
    tools: LlamaCpp, model: Path, text: Path, ctx: int, chunks: int, threads: int
) -> dict:
    """``llama-perplexity``: llama.cpp's own scoring of ``chunks`` windows of ``ctx``
    tokens of ``text`` (second half of each window scored)."""
    result = tools.run(
        "llama-perplexity",
        [
            "-m",
            str(model),
            "-f",
            str(text),
            "-c",
            str(ctx),
            "-b",
            str(ctx),
            "--chunks",
            str(chunks),
            "-t",
            str(threads),
            "--no-warmup",
        ],
    )
    match = _PPL.search(result.stderr + result.stdout)
    if not match:
        raise LlamaCppError(
            f"llama-perplexity printed no final estimate for {model}: "
            + (result.stderr or result.stdout).strip()[-500:]
        )
    return {
        "ppl": float(match.group(1)),
        "stderr": float(match.group(2)),
        "ctx": ctx,
        "chunks": chunks,
    }


def logits(tools: LlamaCpp, model: Path, prompt: str, workdir: Path) -> tuple:
    """(tokens, logits [n_tokens, vocab]) of ``prompt`` from ``llama-results``."""
    import numpy as np
    from gguf import GGUFReader

    out = workdir / f"{model.stem}.results.gguf"
    tools.run(
        "llama-results",
        ["-m", str(model), "-o", str(out), "-p", prompt, "-t", "1"],
    )
    reader = GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    tokens = np.array(tensors["tokens"].data, dtype=np.int64)
    values = np.array(tensors["logits"].data, dtype=np.float32)
    return tokens, values.reshape(len(tokens), -1)


def complete(
    tools: LlamaCpp, model: Path, prompt: str, tokens: int, threads: int
) -> str:
    """Greedy continuation (temperature 0) of ``prompt``: the new text only."""
    result = tools.run(
        "llama-completion",
        [
            "-m",
            str(model),
            "-p",
            prompt,
            "-n",
            str(tokens),
            "--temp",
            "0",
            "-t",
            str(threads),
            "-no-cnv",
            "--no-display-prompt",
            "--no-warmup",
            "-s",
            "0",
        ],
    )
    # llama-completion ends its output with one "\n\n" of its own
    return result.stdout.removesuffix("\n\n")


def bench_once(
    tools: LlamaCpp, model: Path, prompt_len: int, decode_tokens: int, threads: int
) -> dict[str, float]:
    """One ``llama-bench`` run (batch 1: a prompt of ``prompt_len`` tokens, then
    ``decode_tokens`` decoded one at a time): tokens/s of each."""
    result = tools.run(
        "llama-bench",
        [
            "-m",
            str(model),
            "-p",
            str(prompt_len),
            "-n",
            str(decode_tokens),
            "-t",
            str(threads),
            "-r",
            "1",
            "-o",
            "json",
        ],
    )
    rows = json.loads(result.stdout)
    out = {}
    for row in rows:
        kind = "prefill" if row["n_prompt"] and not row["n_gen"] else "decode"
        out[kind] = float(row["avg_ts"])
    if set(out) != {"prefill", "decode"}:
        raise LlamaCppError(f"llama-bench gave {sorted(out)} for {model}")
    return out


def interleaved_bench(
    tools: LlamaCpp,
    models: dict[str, Path],
    prompt_len: int,
    decode_tokens: int,
    threads: int,
    repeats: int,
) -> dict[str, dict[str, list[float]]]:
    """Per model, prefill and decode tokens/s of each repeat, the models run
    alternately (order reversed every other round) so machine noise hits all."""
    names = list(models)
    out = {name: {"prefill": [], "decode": []} for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            speeds = bench_once(tools, models[name], prompt_len, decode_tokens, threads)
            for kind, value in speeds.items():
                out[name][kind].append(value)
    return out


def main() -> None:
    """``python -m saap.runtime.llamacpp``: build (once) and print the build record."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tools = ensure_llamacpp()
    except (LlamaCppError, SourceError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps({"root": str(tools.root)} | tools.info, indent=2))


if __name__ == "__main__":
    main()
