"""Perplexity and fidelity computed from chunks of logit rows equal the same
quantities from the models' whole logits."""

from __future__ import annotations

import pytest
import torch

from saap.evaluation.perplexity import fidelity, window_nll
from saap.model import decoder_and_head, load_model

pytestmark = pytest.mark.unit


@pytest.fixture
def models(tiny_model_dir, tiny_mha_dir):
    return load_model(tiny_model_dir)[0], load_model(tiny_mha_dir)[0]


def whole_logit_nll(model, windows, first=0):
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, first:-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), windows[:, first + 1 :], reduction="none"
    )
    return nll.mean(dim=1).double()


@pytest.mark.parametrize("chunk", [7, 128])
def test_window_nll_equals_the_whole_logit_cross_entropy(
    models, windows, monkeypatch, chunk
):
    # 7 rows per chunk: chunks cross window boundaries and the last is partial
    monkeypatch.setattr("saap.evaluation.perplexity.LOGIT_ROWS", chunk)
    model = models[0]
    torch.testing.assert_close(
        window_nll(model, windows, batch_size=3), whole_logit_nll(model, windows)
    )
    torch.testing.assert_close(
        window_nll(model, windows, batch_size=3, first=16),
        whole_logit_nll(model, windows, first=16),
    )


def test_fidelity_equals_the_whole_logit_kl_and_agreement(models, windows, monkeypatch):
    monkeypatch.setattr("saap.evaluation.perplexity.LOGIT_ROWS", 5)
    reference, model = models
    with torch.no_grad():
        p = torch.log_softmax(reference(input_ids=windows).logits.float(), -1)
        q = torch.log_softmax(model(input_ids=windows).logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0).mean(1).double()
    agree = (p.argmax(-1) == q.argmax(-1)).double().mean(1)
    got_kl, got_agree = fidelity(reference, model, windows, batch_size=3)
    torch.testing.assert_close(got_kl, kl)
    torch.testing.assert_close(got_agree, agree)
    same_kl, same_agree = fidelity(reference, reference, windows)
    assert float(same_kl.max()) < 1e-6 and bool((same_agree == 1).all())


def test_a_model_with_transformed_logits_is_scored_from_its_own_logits(models, windows):
    model = models[0]
    assert decoder_and_head(model) is not None
    model.config.final_logit_softcapping = 30.0  # e.g. Gemma 2
    assert decoder_and_head(model) is None
    with pytest.raises(Exception, match="bias-free projection"):
        decoder_and_head(model, required=True)
    # LLaMA's forward ignores the field: the whole-logit path gives the same
    torch.testing.assert_close(
        window_nll(model, windows, batch_size=3), whole_logit_nll(model, windows)
    )
