"""llama.cpp parity on the real SmolLM2-135M (slow): the f16 GGUF of the dense
model and of a 20%-pruned one (uneven MLP widths, written as ``deci``) give the
perplexity saap computes on the same PTB token windows within 1%, and the same
greedy continuation of the README prompts for 16 tokens."""

from __future__ import annotations

import pytest
import torch
from realkit import prune_real

from saap.evaluation.perplexity import llamacpp_protocol_perplexity
from saap.export.gguf import write_gguf
from saap.model import load_model, save_checkpoint
from saap.params import EvaluateParams
from saap.runtime.llamacpp import complete, ensure_llamacpp, perplexity

pytestmark = pytest.mark.slow

CTX, CHUNKS = 128, 32
PROMPTS = EvaluateParams().prompts  # the README's prompts


@pytest.fixture(scope="module")
def checkpoints(real_assets, tmp_path_factory):
    """The dense checkpoint and a Taylor-pruned 20% one (adaptive allocation)."""
    _, tokenizer, pruned = prune_real(real_assets, "taylor_element1", "adaptive")
    out = tmp_path_factory.mktemp("pruned") / "model"
    save_checkpoint(pruned, tokenizer, out)
    return {"dense": real_assets / "models/base", "pruned": out}


@pytest.mark.parametrize("variant", ["dense", "pruned"])
def test_f16_gguf_matches_saap_perplexity_and_greedy_text(
    checkpoints, real_assets, variant, tmp_path, record_property
):
    tools = ensure_llamacpp()
    gguf = tmp_path / "model-f16.gguf"
    written = write_gguf(checkpoints[variant], gguf, tools.source)
    assert written["architecture"] == ("llama" if variant == "dense" else "deci")
    assert written["pre_tokenizer"] == "smollm"

    text = real_assets / "data/text/ptb_test.txt"
    ours = perplexity(tools, gguf, text, CTX, CHUNKS, threads=2)["ppl"]
    model, tokenizer = load_model(checkpoints[variant])
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    theirs = llamacpp_protocol_perplexity(model, ids, CTX, CHUNKS)
    record_property("ppl", {"llama.cpp": ours, "saap": theirs})
    assert ours == pytest.approx(theirs, rel=0.01)

    # greedy continuations: PyTorch with the matrices rounded to f16 as stored
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(param.half().float())
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        want = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
        got = complete(tools, gguf, prompt, 16, threads=2)
        assert got == want, (prompt, got, want)
