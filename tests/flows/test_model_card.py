"""The model card's measured section: what it shows of an evaluation."""

from __future__ import annotations

import pytest

from flows.model_card import metrics_section

pytestmark = pytest.mark.unit


def test_card_marks_a_perplexity_the_model_trained_in_domain_for():
    evaluation = {
        "profile": "nightly",
        "perplexity": {"ptb": 150.0, "wiki": 50.0},
        "in_domain": ["ptb"],
    }
    dense = {"eval": {"perplexity": {"ptb": 130.0, "wiki": 40.0}}}
    lines = metrics_section(evaluation, {}, dense)
    assert "| perplexity ptb (in-domain) | 150.00 | 130.00 |" in lines
    assert "| perplexity wiki | 50.00 | 40.00 |" in lines
    plain = metrics_section(evaluation | {"in_domain": []}, {}, dense)
    assert "| perplexity ptb | 150.00 | 130.00 |" in plain
