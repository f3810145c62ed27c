"""Recovery fine-tuning on the tiny fixture: loss, merge, resume, reload, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from saap.errors import DataError, PruningError
from saap.finetune import merge, split_records, tokenize_records
from saap.importance.estimators import collect_for
from saap.model import count_params, layer_shapes, load_model, save_checkpoint
from saap.params import FinetuneParams, PruneParams
from saap.plan import plan_from_scores
from saap.prune import prune_model
from saap.recovery import RecoveryData, group_ranks, recover
from saap.scores import scores_from_stats
from stages import finetune as finetune_stage

pytestmark = pytest.mark.unit


class StopAfter(TrainerCallback):
    """Ends training after ``steps`` optimizer steps: an interruption."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
        return control


RECORDS = [
    {
        "instruction": f"Name the {w} word",
        "input": "" if i % 2 else "the model",
        "output": f"The {w} word is {w}.",
    }
    for i, w in enumerate(
        [
            "first",
            "small",
            "river",
            "north",
            "paper",
            "music",
            "city",
            "king",
            "house",
            "water",
            "year",
            "queen",
        ]
    )
]


def tiny_params(**overrides) -> FinetuneParams:
    base = dict(
        method="lora",
        max_steps=6,
        batch_size=4,
        micro_batch_size=2,
        learning_rate=5e-3,
        warmup_steps=0,
        eval_steps=2,
        save_steps=2,
        val_size=2,
        cutoff_len=64,
    )
    base.update(overrides)
    return FinetuneParams(**base)


@pytest.fixture
def pruned(tiny_model_dir, windows, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    stats = collect_for(model, windows, 2, [], progress=False)
    scores = scores_from_stats(stats, [], 0, {"num_layers": 4})
    plan = plan_from_scores(
        scores,
        layer_shapes(model),
        count_params(model),
        PruneParams(ratio=0.25, skip_first=1, skip_last=1),
    )
    small = prune_model(model, plan)
    save_checkpoint(small, tokenizer, tmp_path / "pruned")
    (tmp_path / "plan.json").write_text(plan.dumps())
    (tmp_path / "alpaca.json").write_text(json.dumps(RECORDS))
    return tmp_path, plan


def test_prompt_template_and_truncation(tokenizer):
    examples, truncated = tokenize_records(
        tokenizer, RECORDS[:2], cutoff_len=20, train_on_inputs=False
    )
    assert truncated == 2 and all(len(e.input_ids) == 20 for e in examples)
    full, _ = tokenize_records(
        tokenizer, RECORDS[:1], cutoff_len=512, train_on_inputs=False
    )
    # prompt tokens are masked out of the loss, the response is not
    assert full[0].labels[0] == -100 and full[0].labels[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("method", ["lora", "group_lora"])
def test_training_reduces_loss_and_merge_matches(pruned, method, tmp_path):
    folder, plan = pruned
    model, tokenizer = load_model(folder / "pruned")
    train, val = split_records(RECORDS, 2, 0)
    peft_model, result = recover(
        model,
        tokenizer,
        RecoveryData(train, val),
        tiny_params(method=method),
        tmp_path / "resume",
        plan,
        progress=False,
    )
    assert result.train_losses[-1] < result.train_losses[0]
    ids = torch.tensor([tokenizer("the model is small").input_ids])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = peft_model(input_ids=ids).logits.float()
    merged = merge(peft_model)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        folded = merged(input_ids=ids).logits.float()
    # bf16 has 8 bits of mantissa: logits agree to about 1e-2 of their scale
    assert torch.allclose(folded, adapted, atol=0.05 * adapted.abs().max().item())


def test_group_ranks_follow_pruning_ratio():
    ratios = [0.0, 0.5, 0.3, 0.1, 0.0, 0.0]
    ranks = group_ranks(ratios, base_rank=8, num_groups=3)
    # groups by ratio: {1, 2} (mean 0.4), {3, 0} (0.05), {4, 5} (0); total rank 48
    assert ranks[1] == ranks[2] > ranks[3] == ranks[0] > ranks[4] == ranks[5] == 1
    assert ranks[1] == round(48 * 0.4 / (0.4 * 2 + 0.05 * 2))


def test_resume_gives_the_same_weights(pruned, tmp_path):
    folder, plan = pruned
    params = tiny_params(lora_dropout=0.1)
    train, val = split_records(RECORDS, 2, 0)
    model, tokenizer = load_model(folder / "pruned")
    straight, _ = recover(
        model,
        tokenizer,
        RecoveryData(train, val),
        params,
        tmp_path / "a",
        plan,
        progress=False,
    )
    model, tokenizer = load_model(folder / "pruned")
    stopped, _ = recover(
        model,
        tokenizer,
        RecoveryData(train, val),
        params,
        tmp_path / "b",
        plan,
        callbacks=[StopAfter(4)],
        progress=False,
    )
    assert list((tmp_path / "b").glob("finetune-*/checkpoint-4"))
    model, tokenizer = load_model(folder / "pruned")
    resumed, result = recover(
        model,
        tokenizer,
        RecoveryData(train, val),
        params,
        tmp_path / "b",
        plan,
        progress=False,
    )
    assert result.resumed_from == 4
    a, b = merge(straight).state_dict(), merge(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_saves_same_architecture_that_reloads(pruned, tmp_path):
    folder, _ = pruned
    out = tmp_path / "finetuned"
    summary = finetune_stage.run(
        tiny_params(),
        folder / "pruned",
        folder / "plan.json",
        folder / "alpaca.json",
        out,
        tmp_path / "ft.json",
        tmp_path / "curve.csv",
        tmp_path / "resume",
    )
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    curve = (tmp_path / "curve.csv").read_text().splitlines()
    assert curve[0] == "step,train_loss,val_loss" and len(curve) == 1 + 6
    assert curve[2].split(",")[2] != "" and curve[1].split(",")[2] == ""
    before, _ = load_model(folder / "pruned")
    after, _ = load_model(out)
    assert layer_shapes(after) == layer_shapes(before)
    assert count_params(after) == count_params(before)
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, after(ids).logits)
    assert not list((tmp_path / "resume").glob("finetune-*"))  # cleaned after success


def test_same_inputs_give_a_byte_identical_checkpoint(pruned, tmp_path):
    """Run facts (time, throughput) stay in the report, out of the model's
    folder: DVC and the registry see a re-trained identical model as unchanged."""
    folder, _ = pruned
    outs = []
    for name in ("a", "b"):
        finetune_stage.run(
            tiny_params(),
            folder / "pruned",
            folder / "plan.json",
            folder / "alpaca.json",
            tmp_path / name,
            tmp_path / f"{name}.json",
            tmp_path / f"{name}.csv",
            tmp_path / f"resume-{name}",
        )
        outs.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()})
    assert outs[0] == outs[1]
    report = json.loads((tmp_path / "a.json").read_text())
    record = json.loads((tmp_path / "a" / "saap.json").read_text())["finetune"]
    assert report["seconds"] > 0 and "seconds" not in record
    assert record == {k: v for k, v in report.items() if k in record}


def test_bad_instruction_files_name_the_record(pruned, tmp_path):
    folder, _ = pruned
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="holds no records"):
        finetune_stage.read_records(empty)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([RECORDS[0], {"instruction": "x"}]))
    with pytest.raises(DataError, match="record 1 has no string field 'output'"):
        finetune_stage.read_records(broken)
    not_json = tmp_path / "bad.json"
    not_json.write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        finetune_stage.read_records(not_json)


def test_checkpoint_not_matching_plan_is_rejected(pruned, tiny_model_dir, tmp_path):
    folder, _ = pruned
    with pytest.raises(PruningError, match="plan says"):
        finetune_stage.run(
            tiny_params(),
            tiny_model_dir,
            folder / "plan.json",
            folder / "alpaca.json",
            tmp_path / "o",
            tmp_path / "r.json",
            tmp_path / "c.csv",
            tmp_path / "resume",
        )


def test_stage_trains_the_budget_of_the_active_profile(pruned, tmp_path, capsys):
    """finetune.profiles[evaluate.profile] overrides the budget (the nightly
    flow sets evaluate.profile); a profile that sets nothing runs the section."""
    import yaml

    folder, _ = pruned
    params = tmp_path / "params.yaml"
    finetune = tiny_params().model_dump(exclude={"profiles"}) | {
        "max_steps": 2,
        "profiles": {"nightly": {"max_steps": 4}},
    }
    steps = {}
    for profile in ("quick", "nightly"):
        params.write_text(
            yaml.safe_dump({"finetune": finetune, "evaluate": {"profile": profile}})
        )
        report = tmp_path / f"{profile}.json"
        finetune_stage.main(
            [
                "--params", str(params),
                "--model", str(folder / "pruned"),
                "--plan", str(folder / "plan.json"),
                "--data", str(folder / "alpaca.json"),
                "--out", str(tmp_path / profile),
                "--report", str(report),
                "--curve", str(tmp_path / f"{profile}.csv"),
                "--resume-dir", str(tmp_path / "resume"),
            ]
        )  # fmt: skip
        summary = json.loads(report.read_text())
        assert summary["profile"] == profile
        steps[profile] = summary["steps"]
    assert steps == {"quick": 2, "nightly": 4}
    # an entry for a profile evaluate does not define would never apply
    finetune["profiles"] = {"weekly": {"max_steps": 4}}
    params.write_text(yaml.safe_dump({"finetune": finetune}))
    with pytest.raises(SystemExit):
        finetune_stage.main(["--params", str(params)])
    assert "finetune.profiles.weekly: no evaluation profile 'weekly'" in (
        capsys.readouterr().err
    )


def test_stage_refuses_text_that_makes_the_gate_corpus_in_domain(tmp_path, capsys):
    """Distilling on PTB's train split while the perplexity gates judge PTB is
    refused before any training, naming both keys and the fix."""
    import yaml

    params = tmp_path / "params.yaml"
    finetune = tiny_params(method="kd", kd_corpora=["c4", "ptb_train"]).model_dump()
    params.write_text(yaml.safe_dump({"finetune": finetune}))
    with pytest.raises(SystemExit) as exc:
        finetune_stage.main(["--params", str(params), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "makes ptb in-domain, and gates.ppl_corpus is 'ptb'" in err
    assert "set gates.ppl_corpus to wiki or c4" in err
    assert not (tmp_path / "o").exists()
