"""A LLaMA decoder whose layers may each have their own head and MLP sizes.

Structured pruning leaves layers of different widths, which ``LlamaConfig`` cannot
describe. This file is the only model code the project adds: ``SaapLlamaConfig``
records one entry per layer in ``layer_sizes`` and ``SaapLlamaForCausalLM`` resizes
the projections of a stock ``LlamaForCausalLM`` to match, so every forward pass,
the KV cache and ``generate()`` are transformers' own. It imports only transformers
and torch, so a pruned checkpoint carries a copy of it and loads with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``; importing
``saap`` registers it so that ``trust_remote_code`` is not needed there.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


@strict
class SaapLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus per-layer sizes.

    ``layer_sizes[i]`` = ``{"num_heads", "num_kv_heads", "intermediate_size",
    "o_bias", "down_bias"}``; ``qkv_bias`` adds biases to q/k/v only (Qwen2 style).
    """

    model_type = "saap_llama"
    layer_sizes: list | None = None
    qkv_bias: bool = False


def _linear(n_in: int, n_out: int, bias: bool, like: nn.Linear) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias)
    return layer.to(dtype=like.weight.dtype, device=like.weight.device)


class SaapLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with each layer's projections sized by ``layer_sizes``."""

    config_class = SaapLlamaConfig

    def __init__(self, config: SaapLlamaConfig):
        super().__init__(config)
        sizes = config.layer_sizes or []
        if sizes and len(sizes) != config.num_hidden_layers:
            raise ValueError(
                f"layer_sizes has {len(sizes)} entries for "
                f"{config.num_hidden_layers} layers"
            )
        hidden, head_dim = config.hidden_size, config.head_dim
        for layer, size in zip(self.model.layers, sizes, strict=False):
            attn, mlp = layer.self_attn, layer.mlp
            heads, kv_heads = int(size["num_heads"]), int(size["num_kv_heads"])
            if heads % kv_heads:
                raise ValueError(f"{heads} query heads not divisible by {kv_heads}")
            qkv_bias = bool(config.qkv_bias or config.attention_bias)
            o_bias = bool(size.get("o_bias", config.attention_bias))
            attn.q_proj = _linear(hidden, heads * head_dim, qkv_bias, attn.q_proj)
            attn.k_proj = _linear(hidden, kv_heads * head_dim, qkv_bias, attn.k_proj)
            attn.v_proj = _linear(hidden, kv_heads * head_dim, qkv_bias, attn.v_proj)
            attn.o_proj = _linear(heads * head_dim, hidden, o_bias, attn.o_proj)
            attn.num_key_value_groups = heads // kv_heads
            inter = int(size["intermediate_size"])
            mlp_bias = bool(config.mlp_bias)
            down_bias = bool(size.get("down_bias", mlp_bias))
            mlp.gate_proj = _linear(hidden, inter, mlp_bias, mlp.gate_proj)
            mlp.up_proj = _linear(hidden, inter, mlp_bias, mlp.up_proj)
            mlp.down_proj = _linear(inter, hidden, down_bias, mlp.down_proj)
            mlp.intermediate_size = inter
        self.post_init()
