"""Registered versions are MLflow pyfunc models: saved with a signature and an
input example, loaded by MLflow alone, generating text; the card beside them."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_pyfunc_model_generates_text_with_signature(tmp_path, tiny_model_dir):
    import mlflow.pyfunc
    from huggingface_hub import ModelCard

    from flows.tracking import save_pyfunc

    card = ModelCard("---\nlicense: apache-2.0\n---\n\n# tiny\n")
    save_pyfunc(tiny_model_dir, tmp_path / "model", card)
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    signature = model.metadata.get_input_schema().to_dict()
    assert signature == [{"type": "string", "required": True}]
    params = {p.name: p.default for p in model.metadata.get_params_schema().params}
    assert params == {"max_new_tokens": 32, "temperature": 0.0}
    example = json.loads((tmp_path / "model" / "input_example.json").read_text())
    assert example
    out = model.predict(["the model"], params={"max_new_tokens": 4})
    assert len(out) == 1 and isinstance(out[0], str)
    # greedy: the same prompt gives the same text
    assert model.predict(["the model"], params={"max_new_tokens": 4}) == out
    checkpoint = tmp_path / "model" / "artifacts" / "checkpoint"
    assert (checkpoint / "config.json").is_file()
    assert ModelCard.load(checkpoint / "README.md").data.license == "apache-2.0"
    # the source checkpoint is left as it was
    assert not (tiny_model_dir / "README.md").exists()
