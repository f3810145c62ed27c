"""The MLflow pyfunc model of a registered checkpoint (MLflow "models from code":
this file is copied into every logged model, so loading one needs MLflow,
torch and transformers, not this project).

    model = mlflow.pyfunc.load_model("models:/saap-<name>@champion")
    model.predict(["The capital of France is"], params={"max_new_tokens": 16})

The checkpoint is the ``checkpoint`` artifact (a transformers folder; pruned
ones carry their modeling file, loaded with ``trust_remote_code``). Generation
is greedy unless ``temperature`` > 0.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class TextGenerator(PythonModel):
    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["checkpoint"]
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, dtype=torch.float32
        ).eval()

    def predict(self, context, model_input, params=None) -> list[str]:
        params = params or {}
        if hasattr(model_input, "columns"):  # a DataFrame of one string column
            prompts = [str(p) for p in model_input.iloc[:, 0]]
        else:
            prompts = [str(p) for p in model_input]
        max_new_tokens = int(params.get("max_new_tokens", 32))
        temperature = float(params.get("temperature", 0.0))
        pad = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        outputs = []
        with self.torch.no_grad():
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt")
                sampling = {"do_sample": False}
                if temperature > 0:
                    sampling = {"do_sample": True, "temperature": temperature}
                out = self.model.generate(
                    **ids, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling
                )
                start = ids["input_ids"].shape[1]
                outputs.append(
                    self.tokenizer.decode(out[0, start:], skip_special_tokens=True)
                )
        return outputs


mlflow.models.set_model(TextGenerator())
