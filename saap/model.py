"""Load, describe and save models: base checkpoints and pruned ``saap_llama`` ones."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from saap import modeling_saap_llama
from saap.errors import PruningError, SourceError
from saap.modeling_saap_llama import SaapLlamaConfig, SaapLlamaForCausalLM

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "saap_llama")

_registered = False


def native_bfloat16() -> bool:
    """True where bfloat16 matrix products run in hardware: a CUDA device, or a
    CPU with AMX or AVX512-BF16. Elsewhere (e.g. AVX2-only CPUs) PyTorch emulates
    them: a SmolLM2 forward was measured 3.6x and a backward 30x slower than in
    float32 on such a CPU, so ``auto`` picks float32 there."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def compute_dtype() -> torch.dtype:
    """The fastest dtype of this machine: bfloat16 where native, else float32."""
    return torch.bfloat16 if native_bfloat16() else torch.float32


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` -> :func:`compute_dtype`
    (the dtypes params.yaml allows)."""
    if name == "auto":
        return compute_dtype()
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def register() -> None:
    """Register ``saap_llama`` with the Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    AutoConfig.register("saap_llama", SaapLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(SaapLlamaConfig, SaapLlamaForCausalLM, exist_ok=True)
    _registered = True


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder layer, read off its tensors."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    hidden_size: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    down_bias: bool

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameters of the layer's projections and its two norms."""
        hd, d = self.head_dim, self.hidden_size
        q = self.num_heads * hd * (d + self.qkv_bias)
        kv = 2 * self.num_kv_heads * hd * (d + self.qkv_bias)
        o = self.num_heads * hd * d + d * self.o_bias
        mlp = 2 * self.intermediate_size * (d + self.mlp_bias)
        down = self.intermediate_size * d + d * self.down_bias
        return q + kv + o + mlp + down + 2 * d


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of a LLaMA-family causal LM."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PruningError(
            f"model type {model_type!r} is not supported; supported LLaMA-family "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model.model.layers


# config fields of causal LMs whose logits are more than ``lm_head(final hidden)``
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def decoder_and_head(model, required: bool = False):
    """(decoder stack with its final norm, output projection) of a causal LM whose
    logits are exactly ``head(decoder(ids).last_hidden_state)`` (LLaMA, Qwen2,
    Mistral, SAAP's pruned models; through a PEFT wrapper where there is one),
    so that callers can form the logits a chunk of rows at a time. ``None`` for
    a model that transforms its logits further (softcapping, scaling) or has no
    bias-free projection: callers then use ``model(...).logits``, or with
    ``required`` this raises."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    config = getattr(base, "config", None)
    transforms = [
        name
        for name in _LOGIT_TRANSFORMS
        if getattr(config, name, None) not in (None, 1, 1.0)
    ]
    if (
        head is None
        or not isinstance(head, nn.Linear)
        or head.bias is not None
        or transforms
        or not hasattr(base, "get_decoder")
    ):
        if required:
            raise PruningError(
                f"{type(base).__name__} does not compute its logits as a bias-free "
                f"projection of the final hidden state ({transforms or 'its head'}); "
                "chunked distillation needs one (use finetune.method: lora)"
            )
        return None
    return base.get_decoder(), head


def layer_shape(layer: nn.Module, head_dim: int) -> LayerShape:
    """Derive a layer's sizes from its weight shapes and check they agree."""
    attn, mlp = layer.self_attn, layer.mlp
    q_out, hidden = attn.q_proj.weight.shape
    kv_out = attn.k_proj.weight.shape[0]
    inter = mlp.gate_proj.weight.shape[0]
    if q_out % head_dim or kv_out % head_dim:
        raise PruningError(f"q/k rows {q_out}/{kv_out} are not multiples of {head_dim}")
    shape = LayerShape(
        num_heads=q_out // head_dim,
        num_kv_heads=kv_out // head_dim,
        head_dim=head_dim,
        intermediate_size=inter,
        hidden_size=hidden,
        qkv_bias=attn.q_proj.bias is not None,
        o_bias=attn.o_proj.bias is not None,
        mlp_bias=mlp.gate_proj.bias is not None,
        down_bias=mlp.down_proj.bias is not None,
    )
    checks = {
        "v_proj rows": (attn.v_proj.weight.shape[0], kv_out),
        "o_proj columns": (attn.o_proj.weight.shape[1], q_out),
        "up_proj rows": (mlp.up_proj.weight.shape[0], inter),
        "down_proj columns": (mlp.down_proj.weight.shape[1], inter),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise PruningError(f"inconsistent layer: {what} {got} != {want}")
    if shape.num_heads % shape.num_kv_heads:
        raise PruningError(
            f"{shape.num_heads} query heads are not a multiple of "
            f"{shape.num_kv_heads} key/value heads"
        )
    return shape


def layer_shapes(model: PreTrainedModel) -> list[LayerShape]:
    """Sizes of every decoder layer of ``model``."""
    head_dim = getattr(model.config, "head_dim", None) or (
        model.config.hidden_size // model.config.num_attention_heads
    )
    return [layer_shape(layer, head_dim) for layer in decoder_layers(model)]


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base or pruned checkpoint folder with its tokenizer."""
    register()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SourceError(
            f"{path} is not a checkpoint folder (no config.json); run the stage that "
            "writes it first (e.g. `dvc repro assets` for models/base)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"checkpoint {path} does not load: {exc}") from None
    model.eval()
    return model, tokenizer


def to_saap_config(config, shapes: list[LayerShape]) -> SaapLlamaConfig:
    """A ``SaapLlamaConfig`` for ``config``'s architecture with per-layer ``shapes``."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    fields.pop("layer_sizes", None)
    qkv_bias = bool(shapes and shapes[0].qkv_bias)
    allowed = set(SaapLlamaConfig.__dataclass_fields__) | {"dtype", "torch_dtype"}
    fields = {k: v for k, v in fields.items() if k in allowed or k.startswith("_")}
    fields.update(
        attention_bias=False,
        mlp_bias=bool(shapes and shapes[0].mlp_bias),
        qkv_bias=qkv_bias,
        num_hidden_layers=len(shapes),
        layer_sizes=[
            {
                "num_heads": s.num_heads,
                "num_kv_heads": s.num_kv_heads,
                "intermediate_size": s.intermediate_size,
                "o_bias": s.o_bias,
                "down_bias": s.down_bias,
            }
            for s in shapes
        ],
    )
    config = SaapLlamaConfig(
        **{k: v for k, v in fields.items() if not k.startswith("_")}
    )
    config.architectures = ["SaapLlamaForCausalLM"]
    config.auto_map = {
        "AutoConfig": "modeling_saap_llama.SaapLlamaConfig",
        "AutoModelForCausalLM": "modeling_saap_llama.SaapLlamaForCausalLM",
    }
    return config


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    extra: dict | None = None,
) -> None:
    """Save safetensors + config + tokenizer (+ the model code for ``saap_llama``)."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if model.config.model_type == "saap_llama":
        shutil.copy(modeling_saap_llama.__file__, out_dir / "modeling_saap_llama.py")
    if extra:
        (out_dir / "saap.json").write_text(json.dumps(extra, indent=2) + "\n")
