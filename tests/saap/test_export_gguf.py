"""GGUF export parity on the tiny fixtures: a GQA model pruned to uneven per-layer
sizes (a kv group removed in one layer, odd MLP widths, a removed layer, FLAP bias
compensation) is written, loaded and run by the pinned llama.cpp, and its logits
match PyTorch's on the same tokens.

llama.cpp is built once per machine (``make test`` does it first; cached under
the user cache folder)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saap.errors import ExportError, LlamaCppError
from saap.export import EXPORTERS, get_exporter
from saap.export.gguf import (
    fallbacks,
    pad_mlp,
    permute_rotary,
    read_metadata,
    write_gguf,
)
from saap.model import layer_shapes, load_model, save_checkpoint
from saap.params import ExportParams
from saap.prune import prune_model
from saap.runtime.llamacpp import ensure_llamacpp, logits, perplexity

PROMPT = "The model and the data of the city were small. The river"


@pytest.fixture(scope="session")
def llamacpp():
    return ensure_llamacpp()


def uneven_plan(shapes) -> dict:
    g = torch.Generator().manual_seed(0)

    def channels(n: int) -> list[int]:
        return sorted(
            torch.randperm(shapes[0].intermediate_size, generator=g)[:n].tolist()
        )

    full_heads = list(range(shapes[0].num_heads))
    full_kv = list(range(shapes[0].num_kv_heads))

    def keep(heads, kv, kept_channels):
        return SimpleNamespace(
            removed=False,
            kept_heads=heads,
            kept_kv_heads=kv,
            kept_channels=kept_channels,
        )

    # the fields of saap.plan.Plan that prune_model reads
    return SimpleNamespace(
        layers=[
            keep(full_heads, full_kv, channels(128)),
            # one key/value group (and its two query heads) gone, 37 channels
            keep([2, 3], [1], channels(37)),
            SimpleNamespace(removed=True),
            keep(full_heads, full_kv, channels(100)),
        ]
    )


@pytest.fixture(scope="session", params=["tiny_model_dir", "tiny_qwen_dir"])
def uneven_dir(request, tmp_path_factory):
    model, tokenizer = load_model(request.getfixturevalue(request.param))
    shapes = layer_shapes(model)
    g = torch.Generator().manual_seed(1)
    means = [
        {
            "o": torch.randn(s.num_heads * s.head_dim, generator=g) * 0.1,
            "down": torch.randn(s.intermediate_size, generator=g) * 0.1,
        }
        for s in shapes
    ]
    pruned = prune_model(model, uneven_plan(shapes), input_means=means)
    out = tmp_path_factory.mktemp("uneven") / "model"
    save_checkpoint(pruned, tokenizer, out)
    return out


def f16_reference_logits(model_dir, tokens: np.ndarray) -> np.ndarray:
    """PyTorch logits with the matrices rounded to f16 as the file stores them."""
    model, _ = load_model(model_dir)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(param.half().float())
        ids = torch.as_tensor(tokens, dtype=torch.long)[None]
        return model(input_ids=ids).logits[0].numpy()


def test_uneven_pruned_model_runs_in_llamacpp_with_pytorch_logits(
    uneven_dir, llamacpp, tmp_path
):
    out = tmp_path / "model-f16.gguf"
    written = write_gguf(uneven_dir, out, llamacpp.source, pre_tokenizer="gpt-2")
    # per-layer arrays under deci; the removed layer is not written
    assert written["architecture"] == "deci"
    assert written["block_count"] == 3
    assert written["head_count"] == [4, 2, 4]
    assert written["head_count_kv"] == [2, 1, 2]
    assert written["feed_forward_length"] == [128, 37, 100]
    meta = read_metadata(out)
    assert meta["architecture"] == "deci"
    assert meta["feed_forward_length"] == [128, 37, 100]
    assert meta["attention.head_count_kv"] == [2, 1, 2]

    tokens, got = logits(llamacpp, out, PROMPT, tmp_path)
    _, tokenizer = load_model(uneven_dir)
    # the exported tokenizer splits the text as the Hugging Face one does
    assert tokens.tolist() == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    want = f16_reference_logits(uneven_dir, tokens)
    assert got.shape == want.shape
    scale = np.abs(want).max()
    print("max abs logit difference", np.abs(got - want).max(), "of", scale)
    assert np.abs(got - want).max() < 0.005 * scale, np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_padding_the_mlp_keeps_the_logits_and_fits_quant_blocks(
    uneven_dir, llamacpp, tmp_path
):
    plain, padded = tmp_path / "plain.gguf", tmp_path / "padded.gguf"
    write_gguf(uneven_dir, plain, llamacpp.source, pre_tokenizer="gpt-2")
    info = write_gguf(uneven_dir, padded, llamacpp.source, "gpt-2", pad_mlp_to=32)
    assert info["feed_forward_length"] == [128, 64, 128]
    assert info["model_feed_forward_length"] == [128, 37, 100]
    _, a = logits(llamacpp, plain, PROMPT, tmp_path)
    _, b = logits(llamacpp, padded, PROMPT, tmp_path)
    np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(a).max())


def test_pad_mlp_is_exact_in_pytorch():
    torch.manual_seed(0)
    gate, up, down = torch.randn(37, 8), torch.randn(37, 8), torch.randn(8, 37)
    state = {
        "l.mlp.gate_proj.weight": gate,
        "l.mlp.up_proj.weight": up,
        "l.mlp.down_proj.weight": down,
    }
    assert pad_mlp(state, "l.", 37, 32) == 64
    x = torch.randn(5, 8)

    def mlp(g, u, d):
        return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T

    padded = mlp(*(state[f"l.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")))
    torch.testing.assert_close(padded, mlp(gate, up, down))


def test_permute_rotary_matches_llamacpp_converter():
    # llama.cpp's convert_hf_to_gguf LlamaModel.permute, written out for 2 heads
    w = torch.arange(2 * 8 * 3).reshape(16, 3)
    hf_order = w.reshape(2, 2, 4, 3)  # head, half, pair index, column
    llama_order = hf_order.transpose(1, 2).reshape(16, 3)
    torch.testing.assert_close(permute_rotary(w, 2), llama_order)


def test_exporter_registry_and_quantized_types(uneven_dir, llamacpp, tmp_path):
    assert "gguf" in EXPORTERS
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        get_exporter("onnx")
    params = ExportParams(
        gguf_types=["q8_0", "q4_0"], pre_tokenizer="gpt-2", pad_mlp_to=1
    )
    manifest = get_exporter("gguf").export(uneven_dir, tmp_path, params)
    files = manifest["files"]
    assert list(files) == ["f16", "q8_0", "q4_0"]
    for entry in files.values():
        assert (tmp_path / entry["file"]).stat().st_size == entry["bytes"] > 0
    # hidden 64 fits blocks of 32; the unpadded 37-wide down projection does not
    assert "blk.1.ffn_down.weight" in files["q8_0"]["fallbacks"]
    assert files["q8_0"]["fallbacks"]["blk.1.ffn_down.weight"]["stored"] == "f16"
    assert files["q8_0"]["tensor_types"]["Q8_0"] > 0
    assert files["q8_0"]["bytes"] < files["f16"]["bytes"]
    json.dumps(manifest)  # the manifest is plain JSON


def test_fallbacks_parse_llama_quantize_lines():
    line = (
        "warning: blk.3.ffn_down.weight                 - ncols   1069 not divisible "
        "by  32 (required for type    q8_0) (WARNING: must use F16 due to unusual "
        "shape) -> falling back to     f16\n"
    )
    assert fallbacks(line) == {
        "blk.3.ffn_down.weight": {
            "ncols": 1069,
            "block": 32,
            "wanted": "q8_0",
            "stored": "f16",
        }
    }


def test_unknown_pre_tokenizer_is_a_named_error(tiny_model_dir, llamacpp, tmp_path):
    with pytest.raises(ExportError, match="export.pre_tokenizer"):
        write_gguf(tiny_model_dir, tmp_path / "x.gguf", llamacpp.source)
    assert not list(tmp_path.iterdir())


def test_llamacpp_refusal_is_reported_and_leaves_no_file(llamacpp, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LlamaCppError, match="llama-perplexity failed"):
        perplexity(llamacpp, bad, tmp_path / "bad.gguf", 16, 1, 1)


def test_llama_quantize_refusal_leaves_no_file(llamacpp, tmp_path):
    from saap.runtime.llamacpp import quantize

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    out = tmp_path / "out-q8_0.gguf"
    with pytest.raises(LlamaCppError, match="llama-quantize failed"):
        quantize(llamacpp, bad, out, "q8_0", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_missing_cmake_is_one_error_naming_what_to_install(monkeypatch):
    from saap.runtime import llamacpp as runtime

    real_which = runtime.shutil.which
    monkeypatch.setattr(
        runtime.shutil,
        "which",
        lambda name: None if name == "cmake" else real_which(name),
    )
    with pytest.raises(LlamaCppError, match="needs cmake.*apt-get install cmake g"):
        runtime.check_toolchain()


def test_a_caller_waits_for_the_build_in_progress_and_uses_it(monkeypatch, tmp_path):
    """Two processes needing llama.cpp at once (make run's background build and
    the export stage): the second waits on the build lock, then finds the tools
    built and does not build again."""
    import threading
    import time

    from saap.runtime import llamacpp as runtime

    source = tmp_path / "src"
    monkeypatch.setattr(runtime, "unpack_source", lambda cache: source)
    builds = []
    building = threading.Event()

    def fake_build(cache, root, key, options, compiler, jobs):
        builds.append(key)
        building.set()
        time.sleep(0.5)
        (root / "bin").mkdir(parents=True)
        for tool in runtime.TOOLS:
            (root / "bin" / tool).write_text("")
        info = {"options": options, "build_seconds": 0.5, "jobs": 2}
        (root / "build.json").write_text(json.dumps(info))
        return runtime.LlamaCpp(root, source, info)

    monkeypatch.setattr(runtime, "_build", fake_build)
    results = {}
    first = threading.Thread(
        target=lambda: results.setdefault("first", runtime.ensure_llamacpp(tmp_path))
    )
    first.start()
    assert building.wait(5)
    started = time.perf_counter()
    second = runtime.ensure_llamacpp(tmp_path)  # blocks until the build is done
    waited = time.perf_counter() - started
    first.join()
    assert len(builds) == 1
    assert second.root == results["first"].root
    assert waited > 0.2
    assert second.record == {"options": second.info["options"]}


def test_isa_options_follow_the_cpu_flags():
    from saap.runtime.llamacpp import isa_options

    avx2 = isa_options({"avx", "avx2", "fma", "f16c", "sse4_2", "bmi2"}, "x86_64")
    assert avx2["GGML_NATIVE"] == "OFF" and avx2["GGML_AVX2"] == "ON"
    assert avx2["GGML_AVX512"] == "OFF" and avx2["GGML_AMX_INT8"] == "OFF"
    # AMX stays off where the CPU lists it (it died with SIGILL on a Xeon VM)
    amx = isa_options({"avx2", "avx512f", "amx_tile", "amx_int8"}, "x86_64")
    assert amx["GGML_AVX512"] == "ON" and amx["GGML_AMX_INT8"] == "OFF"
    assert amx["GGML_AMX_TILE"] == amx["GGML_AMX_BF16"] == "OFF"
    # other architectures keep ggml's portable defaults
    assert isa_options({"neon"}, "aarch64") == {"GGML_NATIVE": "OFF"}


def test_every_module_of_the_export_package_registers_its_exporter():
    import pkgutil

    import saap.export

    modules = {m.name for m in pkgutil.iter_modules(saap.export.__path__)}
    registered = {type(e).__module__.rsplit(".", 1)[1] for e in EXPORTERS.values()}
    assert modules == registered == {"gguf"}


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_the_project_include_compiles_only_the_named_parts_unoptimised(tmp_path):
    """The CMake code the llama.cpp build is configured with: a target defined
    in a subdirectory gets -O0 after the Release flags, so does a named source
    of a target that stays optimised; a unity target's sources are concatenated
    except the excluded one; everything else keeps its flags."""
    from saap.runtime.llamacpp import (
        UNITY_TARGETS,
        UNOPTIMISED_SOURCES,
        UNOPTIMISED_TARGETS,
        project_include,
    )

    # the libraries llama-bench times and the quantizer's conversions stay -O3
    assert {"llama-common", "cpp-httplib"} <= set(UNOPTIMISED_TARGETS)
    assert not {
        "ggml",
        "ggml-base",
        "ggml-cpu",
        "llama",
        "llama-perplexity-impl",
    } & set(UNOPTIMISED_TARGETS)
    # what llama_decode runs on a LLaMA model is not among the -O0 sources
    assert set(UNOPTIMISED_SOURCES) == {"src"}
    assert not {
        "llama.cpp",
        "llama-context.cpp",
        "llama-graph.cpp",
        "llama-kv-cache.cpp",
        "llama-model.cpp",
        "llama-model-loader.cpp",
        "llama-quant.cpp",
        "llama-vocab.cpp",
        "unicode.cpp",
    } & set(UNOPTIMISED_SOURCES["src"])
    assert UNITY_TARGETS == ("llama-common",)
    src = tmp_path / "src"
    (src / "common").mkdir(parents=True)
    (src / "lib").mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.19)\nproject(demo CXX)\n"
        "add_subdirectory(common)\nadd_subdirectory(lib)\n"
        "add_library(fast STATIC fast.cpp)\n"
    )
    (src / "common" / "CMakeLists.txt").write_text(
        "project(inner CXX)\nadd_library(slow STATIC slow.cpp)\n"
        "add_library(many STATIC a.cpp b.cpp c.cpp)\n"
    )
    (src / "lib" / "CMakeLists.txt").write_text(
        "add_library(mixed STATIC hot.cpp cold.cpp)\n"
    )
    (src / "fast.cpp").write_text("int fast() { return 1; }\n")
    (src / "common" / "slow.cpp").write_text("int slow() { return 2; }\n")
    for name in "abc":
        (src / "common" / f"{name}.cpp").write_text(f"int {name}() {{ return 3; }}\n")
    (src / "lib" / "hot.cpp").write_text("int hot() { return 4; }\n")
    (src / "lib" / "cold.cpp").write_text("int cold() { return 5; }\n")
    include = tmp_path / "include.cmake"
    include.write_text(
        project_include(
            ("slow",),
            sources={"lib": ("cold.cpp",)},
            unity=("many",),
            unity_excluded={"common": ("c.cpp",)},
        )
    )
    build = tmp_path / "build"
    subprocess.run(
        [
            "cmake",
            "-G",
            "Ninja" if shutil.which("ninja") else "Unix Makefiles",
            "-S",
            str(src),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PROJECT_INCLUDE={include}",
        ],
        check=True,
        capture_output=True,
    )
    commands = subprocess.run(
        ["cmake", "--build", str(build), "--verbose"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()

    def flags_of(source: str) -> str:
        return next(c for c in commands if f"{source} " in c or c.endswith(source))

    for optimised in ("fast.cpp", "hot.cpp"):
        line = flags_of(optimised)
        assert "-O3" in line and "-O0" not in line
    for unoptimised in ("slow.cpp", "cold.cpp"):
        line = flags_of(unoptimised)
        assert line.index("-O3") < line.index("-O0")  # the last -O wins
    unity = [c for c in commands if "unity_" in c and " -c " in c]
    assert len(unity) == 1
    text = next((build / "common").rglob("unity_0_cxx.cxx")).read_text()
    assert "a.cpp" in text and "b.cpp" in text and "c.cpp" not in text
    assert any("c.cpp" in c and " -c " in c for c in commands)


def test_the_build_is_configured_with_the_project_include(monkeypatch, tmp_path):
    """_build hands cmake the include that compiles the untimed targets at -O0 and
    records it; the include file does not stay in the build folder."""
    from saap.runtime import llamacpp as runtime

    monkeypatch.setattr(runtime, "unpack_source", lambda cache: tmp_path / "src")
    monkeypatch.setattr(runtime, "check_toolchain", lambda: None)
    seen = {}

    def fake_run(command, **kwargs):
        if "--build" in command:
            build_dir = Path(command[command.index("--build") + 1])
            (build_dir / "bin").mkdir(parents=True)
            for tool in runtime.TOOLS:
                (build_dir / "bin" / tool).write_text("")
        else:
            flag = next(c for c in command if c.startswith("-DCMAKE_PROJECT_INCLUDE="))
            seen["include"] = Path(flag.partition("=")[2]).read_text()
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(runtime.subprocess, "run", fake_run)
    root = tmp_path / "cache" / "llama.cpp" / "build-key"
    tools = runtime._build(tmp_path / "cache", root, "key", {"A": "B"}, "c++", 2)
    assert seen["include"] == runtime.project_include()
    for target in runtime.UNOPTIMISED_TARGETS:
        assert f"TARGET {target} APPEND PROPERTY COMPILE_OPTIONS -O0" in seen["include"]
    assert "TARGET llama-common PROPERTY UNITY_BUILD ON" in seen["include"]
    assert tools.info["unoptimised"] == list(runtime.UNOPTIMISED_TARGETS)
    assert tools.info["unoptimised_sources"]["src"] == list(
        runtime.UNOPTIMISED_SOURCES["src"]
    )
    assert tools.info["unity"] == ["llama-common"]
    assert sorted(p.name for p in root.iterdir()) == ["bin", "build.json"]


@pytest.mark.parametrize("filters", [True, False])
def test_the_source_extraction_keeps_to_its_folder(tmp_path, monkeypatch, filters):
    """Unpacking the vendored source: plain files land under the folder without
    setuid bits; a path out of it or a link is refused, with tarfile's "data"
    filter and, on a Python without it (Debian 12's 3.11.2), without."""
    import io
    import tarfile

    from saap.errors import SourceError
    from saap.runtime.llamacpp import _extract

    if not filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)

    def archive(name, link=False):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tf.addfile(info)
            else:
                info.size, info.mode = 1, 0o4755
                tf.addfile(info, io.BytesIO(b"x"))
        buf.seek(0)
        return tarfile.open(fileobj=buf)

    out = tmp_path / "out"
    out.mkdir()
    tf = archive("src/a.c")
    _extract(tf, tf.getmembers(), out)
    assert (out / "src" / "a.c").read_bytes() == b"x"
    assert not (out / "src" / "a.c").stat().st_mode & 0o4000
    for name, link in (("../evil.c", False), ("src/link", True)):
        tf = archive(name, link)
        with pytest.raises((SourceError, tarfile.TarError)):
            _extract(tf, tf.getmembers(), out)
    assert not (tmp_path / "evil.c").exists() and not (out / "src" / "link").exists()
