"""Shared fixtures: a tiny LLaMA-architecture model with a tokenizer, and tiny corpora.

Built from a config (no downloads): hidden 64, 4 layers, GQA with 4 query heads
and 2 key/value heads, and a byte-level BPE tokenizer trained on the fixture text.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

# Prefect reads its settings once, when it is first imported (before any fixture
# runs): the temporary server gets time to start on a loaded 2-core CI machine
# (its default, 20 s, was seen to run out there) and sends no telemetry.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

WORDS = (
    "the a of to and in is was for on with as by at from that this it be are "
    "model layer head channel prune weight token data train test city river king "
    "queen music paper science market water north south year house people time "
    "small large early late first last new old high low open close"
).split()


def synthetic_documents(count: int, words_per_doc: int, seed: int) -> list[str]:
    """Deterministic pseudo-text: sentences of words from a fixed list."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(words_per_doc)]
        sentences = [
            " ".join(words[i : i + 12]).capitalize() + "."
            for i in range(0, len(words), 12)
        ]
        docs.append(" ".join(sentences))
    return docs


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


def build_tiny_model(
    num_heads: int = 4, num_kv_heads: int = 2, qkv_bias: bool = False, seed: int = 0
):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if qkv_bias:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(head_dim=64 // num_heads, **common))
    # random init gives near-uniform logits; scale up so the model has preferences
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A ``data/text`` folder with tiny c4, wiki and PTB corpora."""
    out = tmp_path_factory.mktemp("text")
    c4 = synthetic_documents(40, 300, seed=1)
    wiki = synthetic_documents(10, 600, seed=2)
    ptb = synthetic_documents(1, 3000, seed=3)[0].lower()
    (out / "c4.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in c4))
    (out / "wiki.txt").write_text("\n".join(wiki) + "\n")
    (out / "ptb_test.txt").write_text(ptb)
    (out / "ptb_valid.txt").write_text(ptb[: len(ptb) // 2])
    return out


@pytest.fixture(scope="session")
def tokenizer(text_dir):
    texts = [
        json.loads(line)["text"]
        for line in (text_dir / "c4.jsonl").read_text().splitlines()
    ]
    return build_tokenizer(texts + [(text_dir / "wiki.txt").read_text()])


def _save(model, tokenizer, out: Path) -> Path:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """GQA fixture: 4 query heads, 2 key/value heads, 4 layers, hidden 64."""
    return _save(build_tiny_model(4, 2), tokenizer, tmp_path_factory.mktemp("tiny_gqa"))


@pytest.fixture(scope="session")
def tiny_mha_dir(tmp_path_factory, tokenizer) -> Path:
    """Non-GQA fixture: 4 heads, 4 key/value heads."""
    return _save(
        build_tiny_model(4, 4, seed=1), tokenizer, tmp_path_factory.mktemp("tiny_mha")
    )


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, tokenizer) -> Path:
    """Qwen2-style fixture: q/k/v biases, GQA."""
    return _save(
        build_tiny_model(4, 2, qkv_bias=True, seed=2),
        tokenizer,
        tmp_path_factory.mktemp("tiny_qwen"),
    )


@pytest.fixture
def windows(tokenizer, text_dir) -> torch.Tensor:
    """(8, 32) calibration windows from the fixture's c4 text."""
    from saap.data import calibration_documents, sample_windows

    docs = calibration_documents(text_dir, "c4")
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    return sample_windows(ids, 8, 32, seed=0)[0]


@pytest.fixture(scope="session")
def real_assets(tmp_path_factory) -> Path:
    """The real assets (SmolLM2-135M, the seven eval sets, the corpora): ~180 MB of
    pinned downloads into the user cache, then converted into a temp folder."""
    from saap.params import AssetsParams
    from stages.assets import run

    root = tmp_path_factory.mktemp("assets")
    run(
        AssetsParams(),
        root / "models/base",
        root / "data/eval",
        root / "data/text",
        root / "data/instruct",
    )
    return root


def synthetic_eval_records(task: str, count: int) -> list[dict]:
    """Records with each task's original fields (tiny, deterministic)."""
    rng = random.Random(task)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    records = []
    for i in range(count):
        if task == "boolq":
            records.append(
                {"question": words(6), "answer": i % 2 == 0, "passage": words(30)}
            )
        elif task == "piqa":
            records.append(
                {"goal": words(8), "sol1": words(6), "sol2": words(6), "label": i % 2}
            )
        elif task == "hellaswag":
            records.append(
                {
                    "ind": i,
                    "activity_label": words(2),
                    "ctx_a": words(8),
                    "ctx_b": words(3),
                    "ctx": words(11),
                    "endings": [words(5) + " [title]" for _ in range(4)],
                    "source_id": f"s{i}",
                    "split": "val",
                    "split_type": "indomain",
                    "label": str(i % 4),
                }
            )
        elif task == "winogrande":
            records.append(
                {
                    "sentence": words(5) + " _ " + words(5),
                    "option1": words(1),
                    "option2": words(1),
                    "answer": str(1 + i % 2),
                }
            )
        else:
            question_key = "question_stem" if task == "openbookqa" else "question"
            records.append(
                {
                    "id": f"{task}-{i}",
                    question_key: words(10),
                    "choices": {
                        "text": [words(3) for _ in range(4)],
                        "label": list("ABCD"),
                    },
                    "answerKey": "ABCD"[i % 4],
                }
            )
    return records


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory) -> Path:
    """A ``data/eval`` folder of the seven tasks, 6 synthetic records each."""
    from saap.assets import EVAL_TASKS

    out = tmp_path_factory.mktemp("eval")
    for task in EVAL_TASKS:
        (out / f"{task}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in synthetic_eval_records(task, 6))
        )
    return out
