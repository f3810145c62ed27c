"""Teacher-written distillation text on the tiny fixture: seeded sampling that
is prefix-stable, the stage's outputs, the corpus ``teacher`` and its
decontamination on the recovery's own path."""

from __future__ import annotations

import json

import pytest
import torch

from saap.data import evaluation_documents
from saap.distill import distillation_documents, pack, shared_ngrams
from saap.errors import DataError, ParamsError
from saap.model import load_model
from saap.params import FinetuneParams, TeacherTextParams, parse_section
from saap.recovery import RECOVERIES, RecoveryData
from saap.teacher_text import (
    META_FILE,
    TEACHER_FILE,
    generate_teacher_text,
    start_token,
    teacher_documents,
)
from stages import teacher_text as stage

pytestmark = pytest.mark.unit


def params(**overrides) -> TeacherTextParams:
    return TeacherTextParams(
        **(
            {"tokens": 96, "length": 16, "batch_size": 2, "dtype": "float32"}
            | overrides
        )
    )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_samples_are_seeded_full_length_and_prefix_stable(tiny):
    model, tokenizer = tiny
    texts, sampled = generate_teacher_text(model, tokenizer, params())
    # 96 tokens in samples of 16: 6 samples, 3 batches of 2
    assert len(texts) == 6 and sampled == 96
    assert start_token(tokenizer) == tokenizer.bos_token_id
    assert all(texts) and len(set(texts)) == 6
    again, _ = generate_teacher_text(model, tokenizer, params())
    assert again == texts
    # more tokens: the first samples are those of the shorter run
    longer, _ = generate_teacher_text(model, tokenizer, params(tokens=130))
    assert len(longer) == 9 and longer[:6] == texts
    other, _ = generate_teacher_text(model, tokenizer, params(seed=1))
    assert other != texts
    # end-of-text is suppressed: no sample ends early
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.eos_token_id not in row for row in ids)
    # batches already made are taken as they are, not sampled again
    kept = [["x", "y"], ["z"]]  # batch 1 has 1 text, not 2 rows: sampled again
    reused, sampled = generate_teacher_text(model, tokenizer, params(), kept)
    assert reused[:2] == ["x", "y"] and reused[2:] == texts[2:] and sampled == 64


def test_samples_start_at_the_document_separator_or_the_named_token(tiny):
    import copy

    _, tokenizer = tiny
    # no <|endoftext|> in the fixture's vocabulary: its beginning-of-text token
    assert start_token(tokenizer) == tokenizer.bos_token_id == 1
    assert start_token(tokenizer, "</s>") == 2
    with pytest.raises(DataError, match=r"teacher_text\.start '<x>' is not a token"):
        start_token(tokenizer, "<x>")
    gpt2_style = copy.deepcopy(tokenizer)
    gpt2_style.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert start_token(gpt2_style) == gpt2_style.convert_tokens_to_ids("<|endoftext|>")


def test_stage_writes_the_corpus_and_zero_tokens_writes_none(tiny_model_dir, tmp_path):
    out, resume = tmp_path / "teacher_text", tmp_path / "resume"
    record = stage.run(params(), tiny_model_dir, out, resume, tmp_path / "r.json")
    lines = (out / TEACHER_FILE).read_text().splitlines()
    assert len(lines) == record["samples"] == 6
    assert record["sampled_tokens"] == 96 and record["reused_tokens"] == 0
    assert json.loads((tmp_path / "r.json").read_text()) == record
    meta = json.loads((out / META_FILE).read_text())
    assert meta["tokens"] == 96 and meta["settings"]["seed"] == 0
    assert len(meta["settings"]["model_sha256"]) == 64
    # the output holds what decides the text, not how long it took: a second
    # run writes the same bytes (DVC then sees nothing new downstream)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    again = stage.run(params(), tiny_model_dir, out, resume)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert again["reused_tokens"] == 96 and again["sampled_tokens"] == 0
    documents = teacher_documents(out)
    assert documents == [json.loads(line)["text"] for line in lines]
    # more tokens sample only the new batches; another seed reuses nothing
    more = stage.run(params(tokens=160), tiny_model_dir, out, resume)
    assert (more["reused_tokens"], more["sampled_tokens"]) == (96, 64)
    assert teacher_documents(out)[:6] == documents
    reseeded = stage.run(params(seed=3), tiny_model_dir, out, resume)
    assert reseeded["reused_tokens"] == 0
    # none asked for: no model is loaded (this folder holds none), the corpus
    # is empty and the recovery's reading of it says what to set
    stage.run(params(tokens=0), tmp_path / "no-model", tmp_path / "empty", resume)
    assert (tmp_path / "empty" / TEACHER_FILE).read_text() == ""
    with pytest.raises(DataError, match=r"teacher_text\.tokens is 0.*kd_corpora"):
        teacher_documents(tmp_path / "empty")
    with pytest.raises(DataError, match=r"--teacher-text data/teacher_text"):
        distillation_documents(None, ["teacher"], [])
    with pytest.raises(DataError, match=r"dvc repro teacher-text"):
        teacher_documents(tmp_path / "missing")


def test_a_killed_stage_keeps_the_previous_corpus_and_resumes(
    tiny_model_dir, tmp_path, monkeypatch
):
    out, resume = tmp_path / "teacher_text", tmp_path / "resume"
    # the uninterrupted reference keeps its batches elsewhere
    whole = stage.run(params(), tiny_model_dir, tmp_path / "whole", tmp_path / "r2")
    stage.run(params(tokens=32), tiny_model_dir, out, resume)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_load = stage.load_model

    def killed_at_third_batch(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        generate, calls = model.generate, []

        def dies(*a, **k):
            calls.append(1)
            if len(calls) == 2:  # batch 0 is reused; batch 1 done; batch 2 dies
                raise KeyboardInterrupt
            return generate(*a, **k)

        model.generate = dies
        return model, tokenizer

    monkeypatch.setattr(stage, "load_model", killed_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        stage.run(params(), tiny_model_dir, out, resume)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(stage, "load_model", real_load)
    resumed = stage.run(params(), tiny_model_dir, out, resume)
    # batches 0 and 1 come from the killed run's kept batches, batch 2 is new
    assert (resumed["reused_tokens"], resumed["sampled_tokens"]) == (64, 32)
    assert teacher_documents(out) == teacher_documents(tmp_path / "whole")
    assert whole["samples"] == 6


def test_kept_batches_outlive_a_run_without_text(tiny_model_dir, tmp_path):
    """A quick run between two nightly ones writes the empty corpus; the next
    nightly run samples nothing again (batches kept by settings)."""
    out, resume = tmp_path / "teacher_text", tmp_path / "resume"
    first = stage.run(params(), tiny_model_dir, out, resume)
    stage.run(params(tokens=0), tiny_model_dir, out, resume)
    assert (out / TEACHER_FILE).read_text() == ""
    again = stage.run(params(), tiny_model_dir, out, resume)
    assert (again["reused_tokens"], again["sampled_tokens"]) == (96, 0)
    # fewer tokens take the first batches; other settings keep their own
    fewer = stage.run(params(tokens=32), tiny_model_dir, out, resume)
    assert (fewer["reused_tokens"], fewer["sampled_tokens"]) == (32, 0)
    stage.run(params(temperature=0.7), tiny_model_dir, out, resume)
    assert len(list((resume / "teacher-text").iterdir())) == 2
    back = stage.run(params(), tiny_model_dir, out, resume)
    assert (back["reused_tokens"], back["samples"]) == (96, first["samples"])


def test_the_stage_samples_what_the_active_run_profile_asks(tiny_model_dir, tmp_path):
    """teacher_text.profiles: the nightly profile samples where quick does
    not (the stage's dvc.yaml params include evaluate.profile)."""
    import yaml

    from saap.params import load_for_profile

    raw = {
        "teacher_text": {
            "tokens": 0,
            "length": 16,
            "batch_size": 2,
            "dtype": "float32",
            "profiles": {"nightly": {"tokens": 48}},
        },
        "evaluate": {"profile": "nightly"},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    out, report = tmp_path / "teacher_text", tmp_path / "r.json"
    argv = ["--params", str(path), "--model", str(tiny_model_dir), "--out", str(out)]
    argv += ["--report", str(report), "--resume-dir", str(tmp_path / "resume")]
    stage.main(argv)
    assert json.loads(report.read_text())["tokens"] == 48
    assert len(teacher_documents(out)) == 3
    raw["evaluate"]["profile"] = "quick"
    path.write_text(yaml.safe_dump(raw))
    assert load_for_profile(path, "teacher_text")[0].tokens == 0
    stage.main(argv)
    assert json.loads(report.read_text())["tokens"] == 0
    # a profile key no evaluation profile has would never apply
    raw["teacher_text"]["profiles"] = {"nighlty": {"tokens": 48}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"teacher_text\.profiles\.nighlty: no"):
        load_for_profile(path, "teacher_text")
    with pytest.raises(ParamsError, match=r"teacher_text\.profiles\.nightly\.tokenz"):
        parse_section("teacher_text", {"profiles": {"nightly": {"tokenz": 1}}})


def test_teacher_text_is_decontaminated_on_the_recovery_path(tiny, text_dir, tmp_path):
    """A sample that repeats a passage of evaluation text (PTB test) loses the
    passage's 13-grams in the windows the recovery trains on, as every other
    distillation corpus does."""
    _, tokenizer = tiny
    passage = " ".join(evaluation_documents(text_dir, "ptb")[0].split()[100:140])
    # first in the text: packing drops only the tail after the last full window
    samples = [f"it said {passage} and more", "a sample the teacher wrote " * 20]
    folder = tmp_path / "teacher_text"
    folder.mkdir()
    (folder / TEACHER_FILE).write_text(
        "".join(json.dumps({"text": s}) + "\n" for s in samples)
    )
    raw = distillation_documents(text_dir, ["teacher", "c4"], [], folder)
    assert raw[:2] == samples
    assert shared_ngrams(raw, [passage]) > 0
    kd = RECOVERIES.get("kd")
    finetune = FinetuneParams(
        method="kd",
        kd_corpora=["teacher", "c4"],
        max_steps=None,
        cutoff_len=256,
        kd_val_windows=2,
    )
    data = RecoveryData(text_dir=text_dir, teacher_text_dir=folder)
    train, val = kd.windows(tokenizer, data, finetune)

    def decoded(windows):
        return tokenizer.batch_decode(
            windows, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    # the same documents packed without decontamination hold the passage
    assert shared_ngrams(decoded(pack(tokenizer, raw, 256)), [passage]) > 0
    assert shared_ngrams(decoded(torch.cat([train, val])), [passage]) == 0
    # the corpus is a kd_corpora value; the stage's section validates
    assert parse_section("teacher_text", {"tokens": 0}).tokens == 0
    with pytest.raises(Exception, match=r"teacher_text\.length"):
        parse_section("teacher_text", {"length": 0})
