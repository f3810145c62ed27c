"""GGUF export for llama.cpp: the reference f16 file, written with the ``gguf``
package's writer, then quantized types made by ``llama-quantize``.

A model whose layers all have the config's widths is written as ``llama``. One with
per-layer head counts or MLP widths (every pruned checkpoint) is written under
llama.cpp's ``deci`` architecture, which reads ``feed_forward_length``,
``attention.head_count`` and ``attention.head_count_kv`` as per-layer arrays:

- a removed attention block: head count 0 and no attention tensors (deci runs the
  layer attention-free);
- a removed MLP block: refused (:class:`ExportError`): this llama.cpp's deci graph
  skips a layer's whole output when its width is 0, attention included;
- a removed layer (ShortGPT): not written; the checkpoint already renumbers the
  layers it keeps, and the GGUF has that many blocks.

Q and K rows are permuted as llama.cpp's converter does for LLaMA (its rotary
embedding pairs adjacent dimensions, transformers' pairs halves), per layer with
that layer's head counts. Tied embeddings stay tied (no ``output.weight``).
The tokenizer goes in as llama.cpp's BPE (``gpt2``) tokenizer: tokens and types,
merges, special ids, ``add_bos``, the chat template; the pre-tokenizer name is
looked up in the pinned llama.cpp's own table (by the hash of the tokens of a
check text, as its converter does), or given by ``export.pre_tokenizer``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from saap.errors import ExportError
from saap.export import register
from saap.model import SUPPORTED_MODEL_TYPES, layer_shapes, load_model

log = logging.getLogger(__name__)

# the converter's own location of its pre-tokenizer table
PRE_TOKENIZER_TABLE = "conversion/base.py"


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: within each head, interleave the two
    rotary halves (rows ``[h0 .. h_{d/2-1}, h_{d/2} ..]`` -> pairs)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def pre_tokenizer_table(llama_source: Path) -> tuple[str, dict[str, str]]:
    """(check text, {hash: pre-tokenizer name}) read off the pinned llama.cpp
    converter source with ``ast``; nothing of it is executed."""
    path = llama_source / PRE_TOKENIZER_TABLE
    if not path.is_file():
        raise ExportError(f"{path} not found; the llama.cpp source tree is incomplete")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
            break
    else:
        raise ExportError(f"no get_vocab_base_pre in {path}; update the table reader")
    chktxt, table = None, {}
    for stmt in node.body:
        if (
            isinstance(stmt, ast.Assign)
            and getattr(stmt.targets[0], "id", None) == "chktxt"
        ):
            chktxt = ast.literal_eval(stmt.value)
        if isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Compare):
            right = stmt.test.comparators[0]
            if isinstance(right, ast.Constant) and stmt.body:
                first = stmt.body[0]
                if isinstance(first, ast.Assign) and isinstance(
                    first.value, ast.Constant
                ):
                    table[right.value] = first.value.value
    if chktxt is None or not table:
        raise ExportError(f"could not read the pre-tokenizer table of {path}")
    return chktxt, table


def pre_tokenizer_name(
    tokenizer, llama_source: Path | None, override: str | None
) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer."""
    if override:
        return override
    if llama_source is None:
        raise ExportError(
            "the pre-tokenizer name needs the llama.cpp source (its table) or "
            "export.pre_tokenizer set in params.yaml (e.g. smollm, llama-bpe)"
        )
    chktxt, table = pre_tokenizer_table(llama_source)
    digest = hashlib.sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest()
    if digest not in table:
        raise ExportError(
            f"llama.cpp does not know this tokenizer's pre-tokenizer (hash "
            f"{digest}); set export.pre_tokenizer in params.yaml to the name of an "
            "equivalent one (llama.cpp src/llama-vocab.cpp lists them)"
        )
    return table[digest]


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            types.append(
                TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED
            )
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"GGUF export handles LLaMA-family models {SUPPORTED_MODEL_TYPES}, not "
            f"{config.model_type!r}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(
            f"hidden_act {config.hidden_act!r} is not written; llama.cpp's llama and "
            "deci graphs use SiLU"
        )
    rope = (
        getattr(config, "rope_parameters", None)
        or getattr(config, "rope_scaling", None)
        or {}
    )
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ExportError(
            f"rope type {kind!r} is not written by this exporter (default and linear "
            "are); export a model without rope scaling"
        )


def _rope(config) -> tuple[float, float | None]:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None) or rope
    factor = (
        scaling.get("factor")
        if scaling.get("rope_type", scaling.get("type")) == "linear"
        else None
    )
    return float(theta), factor


def pad_mlp(state: dict, prefix: str, width: int, multiple: int) -> int:
    """Zero-pad one layer's MLP to a width that is a multiple of ``multiple``:
    gate/up rows and down columns of zeros add silu(0) * 0 = 0, so the function is
    unchanged, and quantized types whose blocks need such rows apply to it.
    Returns the new width."""
    padded = -(-width // multiple) * multiple if multiple > 1 else width
    extra = padded - width
    if not extra:
        return width
    for proj in ("gate", "up"):
        for kind in ("weight", "bias"):
            key = f"{prefix}mlp.{proj}_proj.{kind}"
            if key in state:
                value = state[key]
                zeros = value.new_zeros((extra, *value.shape[1:]))
                state[key] = torch.cat([value, zeros], dim=0)
    key = f"{prefix}mlp.down_proj.weight"
    value = state[key]
    state[key] = torch.cat([value, value.new_zeros((value.shape[0], extra))], dim=1)
    return padded


def write_gguf(
    model_dir: Path,
    out: Path,
    llama_source: Path | None = None,
    pre_tokenizer: str | None = None,
    name: str | None = None,
    pad_mlp_to: int = 1,
) -> dict:
    """Write the checkpoint in ``model_dir`` as an f16 GGUF file ``out`` (norms and
    biases f32); MLP widths zero-padded to a multiple of ``pad_mlp_to`` (exact).
    Returns what was written (architecture, per-layer sizes)."""
    import gguf

    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    config = model.config
    _check_supported(config)
    shapes = layer_shapes(model)
    head_dim = shapes[0].head_dim
    heads = [s.num_heads for s in shapes]
    kv_heads = [s.num_kv_heads for s in shapes]
    model_widths = [s.intermediate_size for s in shapes]
    state = dict(model.state_dict())
    widths = [
        pad_mlp(state, f"model.layers.{i}.", w, pad_mlp_to) if w else 0
        for i, w in enumerate(model_widths)
    ]
    for index, (h, f) in enumerate(zip(heads, widths, strict=True)):
        if f == 0 and h > 0:
            raise ExportError(
                f"layer {index} has attention but no MLP; llama.cpp's deci graph "
                "drops such a layer's attention output, so it cannot be exported"
            )
    if heads[0] == 0:
        raise ExportError(
            "layer 0 has no attention; llama.cpp reads the head size off layer 0"
        )
    uniform = (
        len(set(heads)) == 1
        and len(set(kv_heads)) == 1
        and len(set(widths)) == 1
        and not any(s.o_bias or s.down_bias or s.qkv_bias or s.mlp_bias for s in shapes)
        and heads[0] * head_dim == config.hidden_size
    )
    arch = "llama" if uniform else "deci"
    vocab_size = config.vocab_size
    tokens, types = _vocab(tokenizer, vocab_size)
    pre = pre_tokenizer_name(tokenizer, llama_source, pre_tokenizer)
    theta, linear_factor = _rope(config)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.name)
    writer.add_block_count(len(shapes))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(widths[0] if uniform else widths)
    writer.add_head_count(heads[0] if uniform else heads)
    writer.add_head_count_kv(kv_heads[0] if uniform else kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    if linear_factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(linear_factor))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ExportError(
            f"{model_dir} has no BPE merges in tokenizer.json; this exporter writes "
            "BPE (gpt2-style) tokenizers only"
        )
    special.add_to_gguf(writer)
    if getattr(tokenizer, "add_bos_token", None) is not None:
        writer.add_add_bos_token(bool(tokenizer.add_bos_token))

    def add(name: str, tensor: torch.Tensor) -> None:
        array = tensor.detach().float().numpy()
        dtype = np.float16 if array.ndim == 2 else np.float32
        writer.add_tensor(name, np.ascontiguousarray(array.astype(dtype)))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:
        add("output.weight", state["lm_head.weight"])
    for i, shape in enumerate(shapes):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        if shape.num_heads:
            add(b + "attn_norm.weight", state[p + "input_layernorm.weight"])
            for proj, heads_for_rows in (
                ("q", shape.num_heads),
                ("k", shape.num_kv_heads),
                ("v", None),
            ):
                for kind in ("weight", "bias"):
                    key = f"{p}self_attn.{proj}_proj.{kind}"
                    if key not in state:
                        continue
                    value = state[key]
                    if heads_for_rows is not None:
                        value = permute_rotary(value, heads_for_rows)
                    add(f"{b}attn_{proj}.{kind}", value)
            add(b + "attn_output.weight", state[p + "self_attn.o_proj.weight"])
            if (key := p + "self_attn.o_proj.bias") in state:
                add(b + "attn_output.bias", state[key])
        if shape.intermediate_size:
            add(b + "ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
            for proj in ("gate", "up", "down"):
                for kind in ("weight", "bias"):
                    if (key := f"{p}mlp.{proj}_proj.{kind}") in state:
                        add(f"{b}ffn_{proj}.{kind}", state[key])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return {
        "architecture": arch,
        "pre_tokenizer": pre,
        "block_count": len(shapes),
        "head_count": heads,
        "head_count_kv": kv_heads,
        "feed_forward_length": widths,
        "model_feed_forward_length": model_widths,
        "padded_channels": sum(widths) - sum(model_widths),
        "tied_embeddings": bool(config.tie_word_embeddings),
        "bytes": out.stat().st_size,
    }


def tensor_types(path: Path) -> dict[str, str]:
    """{tensor name: ggml type name} of a GGUF file."""
    from saap.runtime.gguf_info import read_gguf

    return {t.name: t.type_name for t in read_gguf(path).tensors}


_FALLBACK = re.compile(
    r"(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
    r".*?-> falling back to\s+(\S+)"
)


def fallbacks(quantize_log: str) -> dict[str, dict]:
    """Tensors ``llama-quantize`` stored in another type than it chose because
    their rows do not fit the type's block (its "falling back to" lines)."""
    return {
        m.group(1): {
            "ncols": int(m.group(2)),
            "block": int(m.group(3)),
            "wanted": m.group(4),
            "stored": m.group(5),
        }
        for m in _FALLBACK.finditer(quantize_log)
    }


def summarize_types(types: dict[str, str]) -> dict[str, int]:
    return dict(Counter(types.values()).most_common())


def read_metadata(path: Path) -> dict:
    """A few GGUF header values (architecture, per-layer arrays) for checks."""
    from saap.runtime.gguf_info import read_gguf

    fields = read_gguf(path).fields
    arch = fields["general.architecture"]
    out = {"architecture": arch}
    for key in (
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
    ):
        value = fields.get(f"{arch}.{key}")
        if value is not None:
            out[key] = value
    return json.loads(json.dumps(out, default=int))


# ------------------------------------------------------------------ the exporter


def gguf_file(out_dir: Path, kind: str) -> Path:
    return out_dir / f"model-{kind.lower()}.gguf"


@register
class GGUFExporter:
    """f16 GGUF (the reference) plus ``export.gguf_types`` by ``llama-quantize``."""

    name = "gguf"

    def export(self, model_dir: Path, out_dir: Path, params) -> dict:
        from saap.runtime.llamacpp import ensure_llamacpp, quantize

        tools = ensure_llamacpp()
        reference = gguf_file(out_dir, "f16")
        written = write_gguf(
            model_dir,
            reference,
            tools.source,
            params.pre_tokenizer,
            name=params.name or model_dir.name,
            pad_mlp_to=params.pad_mlp_to,
        )
        files = {"f16": _describe(reference, "f16", "")}
        for kind in params.gguf_types:
            if kind.lower() == "f16":
                continue
            target = gguf_file(out_dir, kind)
            log_text = quantize(tools, reference, target, kind, params.threads)
            files[kind.lower()] = _describe(target, kind, log_text)
        return {
            "format": self.name,
            "written": written,
            "files": files,
            "llama_cpp": tools.record,
        }


def _describe(path: Path, kind: str, quantize_log: str) -> dict:
    types = tensor_types(path)
    fell_back = fallbacks(quantize_log)
    return {
        "file": path.name,
        "type": kind.lower(),
        "bytes": path.stat().st_size,
        "tensor_types": summarize_types(types),
        "fallbacks": fell_back,
        "fallback_count": len(fell_back),
    }
