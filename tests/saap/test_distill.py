"""Distillation recovery on the tiny fixture: packing, the loss, decontamination,
training that brings the student closer to the teacher, resume, reload."""

from __future__ import annotations

import contextlib
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from saap.data import evaluation_documents
from saap.distill import (
    block_loss,
    chunked_kd_loss,
    chunked_topk_kd_loss,
    decontaminate,
    kd_loss,
    pack,
    shared_ngrams,
    split_windows,
    teacher_targets,
    topk_kd_loss,
)
from saap.errors import DataError, PruningError
from saap.finetune import merge
from saap.importance.estimators import collect_for
from saap.model import count_params, layer_shapes, load_model, save_checkpoint
from saap.params import FinetuneParams, PruneParams
from saap.plan import plan_from_scores
from saap.prune import prune_model
from saap.recovery import RecoveryData, layer_groups, recover
from saap.scores import scores_from_stats
from tests.saap.test_finetune import RECORDS, StopAfter

pytestmark = pytest.mark.unit


def kd_params(**overrides) -> FinetuneParams:
    base = dict(
        method="kd",
        max_steps=6,
        batch_size=4,
        micro_batch_size=2,
        learning_rate=1e-4,
        warmup_steps=0,
        eval_steps=2,
        save_steps=2,
        val_size=2,
        cutoff_len=32,
        kd_val_windows=4,
    )
    return FinetuneParams(**(base | overrides))


@pytest.fixture
def student_and_teacher(tiny_model_dir, windows, tmp_path):
    teacher, tokenizer = load_model(tiny_model_dir)
    stats = collect_for(teacher, windows, 2, [], progress=False)
    plan = plan_from_scores(
        scores_from_stats(stats, [], 0, {}),
        layer_shapes(teacher),
        count_params(teacher),
        PruneParams(ratio=0.25, skip_first=1, skip_last=1),
    )
    save_checkpoint(prune_model(teacher, plan), tokenizer, tmp_path / "pruned")
    (tmp_path / "plan.json").write_text(plan.dumps())
    return tmp_path / "pruned", teacher, tokenizer


def test_pack_joins_documents_with_eos_into_full_windows(tokenizer):
    docs = ["the river and the city", "a king", "north south east west"]
    windows = pack(tokenizer, docs, 4)
    ids = sum((tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs), [])
    total = len(ids) + len(docs)  # one EOS after each document
    assert windows.shape == (total // 4, 4)
    flat = windows.flatten().tolist()
    assert flat.count(tokenizer.eos_token_id) >= len(docs) - 1
    with pytest.raises(DataError, match="less than one window"):
        pack(tokenizer, ["a"], 512)
    train, val = split_windows(windows, 1, seed=0)
    assert len(val) == 1 and len(train) == len(windows) - 1


def test_kd_loss_is_the_kl_and_vanishes_on_the_teacher():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=g)
    student = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    loss, kl = kd_loss(teacher, teacher, labels, temperature=2.0, alpha=1.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    p = teacher.softmax(-1)
    by_hand = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    _, kl = kd_loss(student, teacher, labels, temperature=1.0, alpha=1.0)
    assert float(kl) == pytest.approx(float(by_hand), rel=1e-5)
    mixed, kl = kd_loss(student, teacher, labels, temperature=1.0, alpha=0.25)
    ce = torch.nn.functional.cross_entropy(student.view(-1, 11), labels.view(-1))
    assert float(mixed) == pytest.approx(float(0.25 * kl + 0.75 * ce), rel=1e-5)


def test_topk_kl_is_the_full_kl_with_every_token_and_never_above_it():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=g) * 3
    student = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    for temperature in (1.0, 2.0):
        logp = (teacher / temperature).log_softmax(-1)
        _, full = kd_loss(student, teacher, labels, temperature, 1.0)
        values, index = logp.topk(11, dim=-1)
        _, whole = topk_kd_loss(student, values, index, labels, temperature, 1.0)
        assert float(whole) == pytest.approx(float(full), rel=1e-4, abs=1e-5)
        for k in (1, 3, 8):
            values, index = logp.topk(k, dim=-1)
            _, part = topk_kd_loss(student, values, index, labels, temperature, 1.0)
            assert 0.0 <= float(part) <= float(full) + 1e-6
        # the student equal to the teacher: zero, whatever k
        values, index = logp.topk(3, dim=-1)
        _, same = topk_kd_loss(teacher, values, index, labels, temperature, 1.0)
        assert float(same) == pytest.approx(0.0, abs=1e-5)
    values, index = teacher.log_softmax(-1).topk(4, dim=-1)
    mixed, kl = topk_kd_loss(student, values, index, labels, 1.0, 0.25)
    ce = torch.nn.functional.cross_entropy(student.view(-1, 11), labels.view(-1))
    assert float(mixed) == pytest.approx(float(0.25 * kl + 0.75 * ce), rel=1e-5)


def _fused_case(seed=0, rows=300, vocab=4096, dim=16):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g).to(torch.bfloat16)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    t_hidden = torch.randn(rows, dim, generator=g).to(torch.bfloat16)
    t_weight = (torch.randn(vocab, dim, generator=g) * 0.5).to(torch.bfloat16)
    return hidden, weight, t_hidden, t_weight


def _kd_in_bf16(case, temperature):
    hidden, weight, t_hidden, t_weight = case
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, kl = chunked_kd_loss(h, w, t_hidden, t_weight, None, temperature, 1.0)
    loss.backward()
    return float(loss), h.grad.float(), w.grad


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile's CPU kernels need a C++ compiler (the eager step runs)",
)
def test_the_compiled_chunk_step_gives_the_eager_loss_and_gradients(monkeypatch):
    """The kd step's compiled KL pass (the path a real vocabulary takes) against
    the eager chunk step on the same bf16 inputs: the same loss to float32
    rounding, gradients to bf16 rounding; validation (no grad) the same value."""
    import saap.distill as distill

    monkeypatch.setattr(distill, "KD_CHUNK_ROWS", 256)  # a whole and a partial chunk
    monkeypatch.setattr(distill, "FUSED_MIN_LOGITS", 256 * 4096)
    monkeypatch.setattr(distill, "_FUSED", {})
    case = _fused_case()
    monkeypatch.setenv("SAAP_KD_COMPILE", "0")
    assert distill.fused_kl_rows(256, 4096) is None
    eager = _kd_in_bf16(case, 2.0)
    monkeypatch.setenv("SAAP_KD_COMPILE", "1")
    assert distill.fused_kl_rows(256, 4096) is not None
    assert distill.fused_kl_rows(255, 4096) is None  # under the size it pays at
    fused = _kd_in_bf16(case, 2.0)
    assert not distill._FUSED.get("off")  # compiled, not fallen back
    assert fused[0] == pytest.approx(eager[0], rel=1e-5)
    torch.testing.assert_close(fused[1], eager[1], rtol=2e-2, atol=1e-6)
    torch.testing.assert_close(fused[2], eager[2], rtol=2e-2, atol=1e-6)
    hidden, weight, t_hidden, t_weight = case
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_kd_loss(hidden, weight, t_hidden, t_weight, None, 2.0, 1.0)
    assert float(loss) == pytest.approx(eager[0], rel=1e-5)


def _no_compiler():
    """A ``torch.compile`` stand-in whose functions fail as inductor does on a
    machine without a C++ compiler, and the list of their calls."""
    attempts = []

    def no_compiler(fn, **kwargs):
        def broken(*args):
            attempts.append(1)
            raise RuntimeError("InvalidCxxCompiler: No working C compiler found")

        return broken

    return attempts, no_compiler


def test_a_failed_compile_falls_back_to_the_eager_step_with_a_warning(
    monkeypatch, caplog
):
    import saap.distill as distill

    attempts, no_compiler = _no_compiler()
    monkeypatch.setattr(distill, "KD_CHUNK_ROWS", 256)
    monkeypatch.setattr(distill, "FUSED_MIN_LOGITS", 256 * 4096)
    monkeypatch.setattr(distill, "_FUSED", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
    case = _fused_case(seed=1)
    monkeypatch.setenv("SAAP_KD_COMPILE", "1")
    with caplog.at_level("WARNING", logger="saap.distill"):
        fallen = _kd_in_bf16(case, 1.0)
    assert "torch.compile of the kd loss failed" in caplog.text
    assert "No working C compiler" in caplog.text
    assert distill._FUSED.get("off")  # not tried again
    assert len(attempts) == 1  # not on the step's later chunks either
    assert caplog.text.count("compile of the kd loss failed") == 1
    assert distill.fused_kl_rows(256, 4096) is None
    monkeypatch.setenv("SAAP_KD_COMPILE", "0")
    eager = _kd_in_bf16(case, 1.0)
    assert fallen[0] == eager[0]
    assert torch.equal(fallen[1], eager[1]) and torch.equal(fallen[2], eager[2])


@pytest.mark.parametrize(
    "temperature,alpha", [(1.0, 1.0), (2.0, 1.0), (1.0, 0.25), (2.0, 0.5)]
)
@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_kd_loss_equals_the_full_logit_loss_and_its_gradients(
    monkeypatch, temperature, alpha, frozen_head
):
    # 10 rows in chunks of 4: two whole chunks and a partial one
    monkeypatch.setattr("saap.distill.KD_CHUNK_ROWS", 4)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 6, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(10, 6, generator=g, dtype=torch.float64)
    t_weight = torch.randn(13, 6, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 13, (10,), generator=g)
    grads = {}
    for name in ("full", "chunked"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen_head)
        if name == "full":
            loss, kl = kd_loss(
                h @ w.T, t_hidden @ t_weight.T, labels, temperature, alpha
            )
        else:
            loss, kl = chunked_kd_loss(
                h, w, t_hidden, t_weight, labels, temperature, alpha
            )
        (loss * 3).backward()  # an outer factor reaches both gradients
        grads[name] = (float(loss.detach()), float(kl.detach()), h.grad, w.grad)
    full, chunked = grads["full"], grads["chunked"]
    assert chunked[0] == pytest.approx(full[0], rel=1e-5)
    assert chunked[1] == pytest.approx(full[1], rel=1e-5)
    torch.testing.assert_close(chunked[2], full[2], rtol=1e-4, atol=1e-7)
    if frozen_head:
        assert chunked[3] is None
    else:
        torch.testing.assert_close(chunked[3], full[3], rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # validation: the same value, no gradient kept
        loss, kl = chunked_kd_loss(
            hidden, weight, t_hidden, t_weight, labels, temperature, alpha
        )
    assert float(loss) == pytest.approx(full[0], rel=1e-5)
    assert not loss.requires_grad


@pytest.mark.parametrize(
    "temperature,alpha", [(1.0, 1.0), (2.0, 1.0), (1.0, 0.25), (2.0, 0.5)]
)
@pytest.mark.parametrize("k", [1, 4, 13])
def test_chunked_topk_kd_loss_equals_the_whole_logit_topk_loss_and_its_gradients(
    monkeypatch, temperature, alpha, k
):
    """The cached-targets loss in row chunks, with its gradient written out by
    hand, against :func:`topk_kd_loss` on whole logits under autograd; k = 13
    is the whole vocabulary (the student's tail at its floor)."""
    monkeypatch.setattr("saap.distill.KD_CHUNK_ROWS", 4)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(10, 13, generator=g, dtype=torch.float64) * 2
    logp, index = (teacher / temperature).log_softmax(-1).topk(k, dim=-1)
    labels = torch.randint(0, 13, (10,), generator=g)
    grads = {}
    for name in ("whole", "chunked"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if name == "whole":
            loss, kl = topk_kd_loss(h @ w.T, logp, index, labels, temperature, alpha)
        else:
            loss, kl = chunked_topk_kd_loss(
                h, w, logp, index, labels, temperature, alpha
            )
        (loss * 3).backward()
        grads[name] = (float(loss.detach()), float(kl.detach()), h.grad, w.grad)
    whole, chunked = grads["whole"], grads["chunked"]
    # both form float32 softmaxes: equal to float32 rounding
    assert chunked[0] == pytest.approx(whole[0], rel=1e-5)
    assert chunked[1] == pytest.approx(whole[1], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(chunked[2], whole[2], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(chunked[3], whole[3], rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        loss, _ = chunked_topk_kd_loss(
            hidden, weight, logp, index, labels, temperature, alpha
        )
    assert float(loss) == pytest.approx(whole[0], rel=1e-5)


def test_chunked_kd_loss_needs_labels_to_mix_in_the_lm_loss():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="labels"):
        chunked_kd_loss(x, torch.randn(5, 4), x, torch.randn(5, 4), None, 1.0, 0.5)


def test_the_trainer_loss_is_the_full_logit_kl_of_the_models(student_and_teacher):
    from saap.distill import distill_trainer_class

    pruned_dir, teacher, tokenizer = student_and_teacher
    student, _ = load_model(pruned_dir)
    ids = torch.randint(0, student.config.vocab_size, (2, 16))
    trainer = object.__new__(distill_trainer_class())  # only compute_loss is used
    trainer.teacher, trainer.temperature, trainer.alpha = teacher, 2.0, 0.5

    class NoAutocast:
        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

    trainer.accelerator = NoAutocast()
    loss = trainer.compute_loss(student, {"input_ids": ids})
    with torch.no_grad():
        expected, _ = kd_loss(
            student(input_ids=ids).logits[:, :-1],
            teacher(input_ids=ids).logits[:, :-1],
            ids[:, 1:],
            2.0,
            0.5,
        )
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert loss.requires_grad


def test_validation_keeps_the_teacher_states_of_each_held_out_batch(
    student_and_teacher,
):
    from saap.distill import distill_trainer_class

    pruned_dir, teacher, _ = student_and_teacher
    student, _ = load_model(pruned_dir)
    trainer = object.__new__(distill_trainer_class())  # no Trainer set-up needed
    trainer.teacher, trainer.temperature, trainer.alpha = teacher, 2.0, 0.5
    trainer.held_out_teacher = {}

    class NoAutocast:
        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

    trainer.accelerator = NoAutocast()
    counter = CountingForward(teacher.model)  # the teacher's decoder
    a = torch.randint(0, student.config.vocab_size, (2, 16))
    b = torch.randint(0, student.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected_a = trainer.compute_loss(student, {"input_ids": a})
        expected_b = trainer.compute_loss(student, {"input_ids": b})
    assert counter.calls == 2
    first = [
        trainer.prediction_step(student, {"input_ids": ids}, True)[0] for ids in (a, b)
    ]
    again = [
        trainer.prediction_step(student, {"input_ids": ids}, True)[0] for ids in (a, b)
    ]
    assert counter.calls == 4  # one teacher pass per batch, at the first evaluation
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.equal(first[0], expected_a) and torch.equal(first[1], expected_b)
    assert not first[0].requires_grad
    # the student changes between evaluations; the kept teacher states do not
    with torch.no_grad():
        student.model.norm.weight.mul_(1.5)
    moved = trainer.prediction_step(student, {"input_ids": a}, True)[0]
    with torch.no_grad():
        assert torch.equal(moved, trainer.compute_loss(student, {"input_ids": a}))
    assert not torch.equal(moved, first[0])
    # the same tokens in another shape are another batch
    trainer.prediction_step(student, {"input_ids": a.reshape(4, 8)}, True)
    assert counter.calls == 6


class CountingForward:
    """Counts a model's forward passes (a forward pre-hook)."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


def test_teacher_targets_are_cached_and_verified(tiny_model_dir, windows, tmp_path):
    teacher, _ = load_model(tiny_model_dir)
    counter = CountingForward(teacher)
    first = teacher_targets(teacher, windows, 5, 1.0, tmp_path, batch_size=4)
    assert first.computed and counter.calls == 2
    (cached,) = (tmp_path / "teacher-topk").glob("*.safetensors")
    assert first.logp.shape == first.index.shape == (8, 31, 5)
    with torch.no_grad():
        logp = teacher(input_ids=windows).logits[:, :-1].float().log_softmax(-1)
    assert torch.allclose(first.logp, logp.topk(5, dim=-1).values, atol=1e-5)
    again = teacher_targets(teacher, windows, 5, 1.0, tmp_path)
    assert not again.computed and counter.calls == 3  # no teacher pass
    assert torch.equal(again.logp, first.logp) and torch.equal(again.index, first.index)
    # another k, temperature or window set is another entry
    teacher_targets(teacher, windows, 5, 2.0, tmp_path)
    teacher_targets(teacher, windows[:4], 5, 1.0, tmp_path)
    assert counter.calls == 5
    # a damaged file is not trusted: recomputed and replaced
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    repaired = teacher_targets(teacher, windows, 5, 1.0, tmp_path)
    assert repaired.computed and torch.equal(repaired.logp, first.logp)
    with pytest.raises(DataError, match="kd_topk 0"):
        teacher_targets(teacher, windows, 0, 1.0, tmp_path)


def test_topk_distillation_skips_the_teacher_on_cached_windows(
    student_and_teacher, text_dir, tmp_path
):
    pruned_dir, teacher, tokenizer = student_and_teacher
    held = pack(tokenizer, evaluation_documents(text_dir, "wiki"), 32)[:8]
    data = RecoveryData(
        RECORDS[:10],
        RECORDS[10:],
        text_dir=text_dir,
        teacher=teacher,
        cache_dir=tmp_path / "cache",
    )
    params = kd_params(kd_topk=8)
    student, _ = load_model(pruned_dir)
    before = validation_kl(student, teacher, held)
    counter = CountingForward(teacher)
    trained, result = recover(
        student, tokenizer, data, params, tmp_path / "a", progress=False
    )
    # one teacher pass per batch of windows to fill the cache, none in training
    assert counter.calls == 1 + (6 * 4 + 4 - 1) // 8
    assert result.steps == 6 and validation_kl(trained, teacher, held) < before
    calls = counter.calls
    student, _ = load_model(pruned_dir)
    again, _ = recover(student, tokenizer, data, params, tmp_path / "b", progress=False)
    assert counter.calls == calls  # the second run never runs the teacher
    a, b = trained.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_decontamination_cuts_shared_13_grams_only():
    evaluation = [
        "one two three four five six seven eight nine ten eleven twelve "
        "thirteen fourteen"
    ]
    clean = "alpha beta gamma"
    dirty = (
        "start here ONE two three four five six seven eight nine ten eleven "
        "twelve thirteen end there"
    )
    out, removed = decontaminate([clean, dirty], evaluation)
    assert out == [clean, "start here", "end there"] and removed == 13
    assert shared_ngrams(out, evaluation) == 0 < shared_ngrams([dirty], evaluation)


def test_distillation_only_corpora_are_read_whole_and_named_when_missing(
    text_dir, tmp_path
):
    import json
    import shutil

    from saap.distill import distillation_documents

    folder = tmp_path / "text"
    shutil.copytree(text_dir, folder)
    sciq = ["Plants make sugar from light.\nWhat do plants make?\nsugar", "b c"]
    (folder / "sciq.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in sciq)
    )
    c4_half = distillation_documents(folder, ["c4"], [])
    both = distillation_documents(folder, ["c4", "sciq", "instruct"], ["x y"])
    assert both == [*c4_half, *sciq, "x y"]  # all of sciq: no half is evaluated
    with pytest.raises(DataError, match=r"mmlu\.jsonl is missing.*kd_corpora"):
        distillation_documents(folder, ["mmlu"], [])
    with pytest.raises(DataError, match=r"unknown distillation corpus 'ptb'"):
        distillation_documents(folder, ["ptb"], [])


def test_ptb_train_is_read_in_line_blocks_and_makes_ptb_in_domain(
    text_dir, tmp_path
):
    import shutil

    from saap.data import PTB_LINES_PER_DOCUMENT, in_domain_corpora
    from saap.distill import distillation_documents
    from saap.recovery import RECOVERIES

    folder = tmp_path / "text"
    shutil.copytree(text_dir, folder)
    with pytest.raises(DataError, match=r"ptb_train\.txt is missing.*treebank"):
        distillation_documents(folder, ["ptb_train"], [])
    lines = [f" sentence {i} of the train split <unk> N " for i in range(250)]
    (folder / "ptb_train.txt").write_text("\n".join(lines) + "\n")
    docs = distillation_documents(folder, ["c4", "ptb_train"], [])
    ptb = docs[len(distillation_documents(folder, ["c4"], [])) :]
    # blocks of lines, newlines kept as in the test text, nothing dropped
    assert len(ptb) == 3 and ptb[0].count("\n") == PTB_LINES_PER_DOCUMENT - 1
    assert "\n".join(ptb).splitlines() == lines
    assert in_domain_corpora(["c4", "ptb_train", "instruct"]) == ["ptb"]
    assert in_domain_corpora(["c4", "wiki", "sciq", "mmlu", "instruct"]) == []
    # only recoveries that train on the distillation text carry its domain
    with_ptb = kd_params(kd_corpora=["c4", "ptb_train"])
    assert RECOVERIES.get("kd").in_domain(with_ptb) == ["ptb"]
    assert RECOVERIES.get("group").in_domain(with_ptb) == ["ptb"]
    assert RECOVERIES.get("lora").in_domain(with_ptb) == []
    assert RECOVERIES.get("kd").in_domain(kd_params()) == []


def test_stage_records_in_domain_text_and_evaluation_reports_it(
    student_and_teacher, tiny_model_dir, text_dir, tmp_path
):
    """A model distilled on PTB's train split carries ``in_domain: [ptb]`` in
    its checkpoint and report; the evaluation reads it from the checkpoint; a
    model distilled on the default text carries nothing (its bytes unchanged)."""
    import shutil

    from saap.evaluation.report import trained_in_domain
    from stages import finetune as finetune_stage

    pruned_dir, _, _ = student_and_teacher
    folder = tmp_path / "text"
    shutil.copytree(text_dir, folder)
    lines = [f" the company said {i} shares rose <unk> N " for i in range(400)]
    (folder / "ptb_train.txt").write_text("\n".join(lines) + "\n")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(RECORDS))
    found = {}
    for name, corpora in (("plain", ["c4", "wiki"]), ("ptb", ["c4", "ptb_train"])):
        summary = finetune_stage.run(
            kd_params(max_steps=2, kd_corpora=corpora),
            pruned_dir,
            tmp_path / "plan.json",
            alpaca,
            tmp_path / name,
            tmp_path / f"{name}.json",
            tmp_path / f"{name}.csv",
            tmp_path / f"resume-{name}",
            teacher_dir=tiny_model_dir,
            text_dir=folder,
        )
        found[name] = (summary.get("in_domain"), trained_in_domain(tmp_path / name))
    assert found == {"plain": (None, []), "ptb": (["ptb"], ["ptb"])}


def test_extra_text_records_read_as_documents():
    from saap.assets import mmlu_document, sciq_document

    assert (
        sciq_document(
            {
                "support": " Light drives it. ",
                "question": "What?",
                "correct_answer": "x",
            }
        )
        == "Light drives it.\nWhat?\nx"
    )
    assert (
        sciq_document({"support": "", "question": "What?", "correct_answer": "x"})
        == "What?\nx"
    )
    assert (
        mmlu_document(
            {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1}
        )
        == "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B. 4"
    )


def validation_kl(student, teacher, windows) -> float:
    with torch.no_grad():
        _, kl = kd_loss(
            student(input_ids=windows).logits[:, :-1],
            teacher(input_ids=windows).logits[:, :-1],
            None,
            1.0,
            1.0,
        )
    return float(kl)


def test_distillation_moves_the_student_toward_the_teacher(
    student_and_teacher, text_dir, tmp_path
):
    pruned_dir, teacher, tokenizer = student_and_teacher
    student, _ = load_model(pruned_dir)
    held = pack(tokenizer, evaluation_documents(text_dir, "wiki"), 32)[:8]
    before = validation_kl(student, teacher, held)
    data = RecoveryData(RECORDS[:10], RECORDS[10:], text_dir=text_dir, teacher=teacher)
    trained, result = recover(
        student, tokenizer, data, kd_params(), tmp_path / "resume", progress=False
    )
    assert result.steps == 6 and result.tokens == 6 * 4 * 32
    assert result.trainable_params == count_params(trained)  # every weight
    assert sorted(result.val_losses) == [2, 4, 6]
    assert min(result.val_losses.values()) < result.val_losses[2] or math.isclose(
        min(result.val_losses.values()), result.val_losses[2]
    )
    assert validation_kl(trained, teacher, held) < before
    if trained.config.tie_word_embeddings:  # the best step's weights stay tied
        assert trained.lm_head.weight.data_ptr() == (
            trained.model.embed_tokens.weight.data_ptr()
        )
    # a model trained in full is merged as it is and reloads with plain transformers
    merged = merge(trained)
    save_checkpoint(merged, tokenizer, tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", trust_remote_code=True
    )
    ids = held[:1]
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, merged(input_ids=ids).logits)


@pytest.fixture
def small_kernel_threshold(monkeypatch):
    import saap.distill as distill

    monkeypatch.setattr(distill, "KERNELS_MIN_PARAMS", 0)
    return distill


def _decoder_step(student, teacher, ids):
    """Loss and gradients of one float32 distillation step (no autocast, so
    compiled and eager kernels are compared at float32 rounding)."""
    from saap.distill import distillation_loss

    student.zero_grad(set_to_none=True)
    loss, _ = distillation_loss(
        student, teacher, ids, 1.0, 1.0, lambda: contextlib.nullcontext()
    )
    loss.backward()
    return float(loss.detach()), {
        n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None
    }


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile's CPU kernels need a C++ compiler (the eager step runs)",
)
def test_compiled_decoder_kernels_give_the_eager_step_and_restore_the_models(
    student_and_teacher, small_kernel_threshold, monkeypatch
):
    """RMSNorm, SiLU gate and rotary compiled (the path a real model takes)
    against transformers' own modules on the pruned tiny model (layers of
    different widths): the same loss and gradients to float32 rounding; on exit
    every module's own forward and transformers' rotary function are back."""
    from transformers.models.llama import modeling_llama

    distill = small_kernel_threshold
    pruned_dir, teacher, _ = student_and_teacher
    student, _ = load_model(pruned_dir)
    student.train()
    ids = torch.randint(0, student.config.vocab_size, (2, 24))
    monkeypatch.setenv("SAAP_KD_COMPILE", "1")
    monkeypatch.setattr(distill, "_KERNELS", {})
    rotary = modeling_llama.apply_rotary_pos_emb
    eager = _decoder_step(student, teacher, ids)
    with distill.compiled_decoder_kernels(student, teacher):
        patched = [m for m in student.modules() if "forward" in vars(m)]
        norms = [m for m in patched if isinstance(m, modeling_llama.LlamaRMSNorm)]
        mlps = [m for m in patched if isinstance(m, modeling_llama.LlamaMLP)]
        assert len(norms) == 2 * len(student.model.layers) + 1
        assert len(mlps) == len(student.model.layers)
        assert modeling_llama.apply_rotary_pos_emb is not rotary
        compiled = _decoder_step(student, teacher, ids)
        with distill.compiled_decoder_kernels(student, teacher):  # nested: a no-op
            pass
        assert len([m for m in student.modules() if "forward" in vars(m)]) == len(
            patched
        )
        assert modeling_llama.apply_rotary_pos_emb is not rotary
    assert not distill._KERNELS.get("off")  # compiled, not fallen back
    assert modeling_llama.apply_rotary_pos_emb is rotary
    for module in (*student.modules(), *teacher.modules()):
        assert "forward" not in vars(module)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4)
    assert compiled[1].keys() == eager[1].keys()
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-4, atol=1e-6)
    assert _decoder_step(student, teacher, ids)[0] == eager[0]  # eager again


def test_compiled_decoder_kernels_skip_small_models_and_the_switch(
    student_and_teacher, monkeypatch
):
    import saap.distill as distill

    pruned_dir, teacher, _ = student_and_teacher
    student, _ = load_model(pruned_dir)
    monkeypatch.setattr(distill, "_KERNELS", {})
    assert distill.KERNELS_MIN_PARAMS > count_params(teacher)
    with distill.compiled_decoder_kernels(student, teacher):
        assert all("forward" not in vars(m) for m in student.modules())
    assert distill._KERNELS == {}  # nothing compiled
    monkeypatch.setattr(distill, "KERNELS_MIN_PARAMS", 0)
    monkeypatch.setenv("SAAP_KD_COMPILE", "0")
    with distill.compiled_decoder_kernels(student, teacher):
        assert all("forward" not in vars(m) for m in student.modules())


def test_a_failed_kernel_compile_runs_the_decoder_eager_with_one_warning(
    student_and_teacher, small_kernel_threshold, monkeypatch, caplog
):
    distill = small_kernel_threshold
    attempts, no_compiler = _no_compiler()
    pruned_dir, teacher, _ = student_and_teacher
    student, _ = load_model(pruned_dir)
    student.train()
    ids = torch.randint(0, student.config.vocab_size, (2, 24))
    eager = _decoder_step(student, teacher, ids)
    monkeypatch.setattr(distill, "_KERNELS", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setenv("SAAP_KD_COMPILE", "1")
    with caplog.at_level("WARNING", logger="saap.distill"):
        with distill.compiled_decoder_kernels(student, teacher):
            fallen = _decoder_step(student, teacher, ids)
    assert caplog.text.count("element-wise kernels failed") == 1
    assert "No working C compiler" in caplog.text
    assert len(attempts) == 1  # not tried again on later layers or steps
    assert fallen[0] == eager[0]
    for name, grad in eager[1].items():
        assert torch.equal(fallen[1][name], grad)


def test_a_frozen_embedding_keeps_the_vocabulary_matrix_and_trains_the_rest(
    student_and_teacher, text_dir, tmp_path
):
    pruned_dir, teacher, tokenizer = student_and_teacher
    student, _ = load_model(pruned_dir)
    embedding = student.get_input_embeddings().weight.detach().clone()
    head = student.get_output_embeddings().weight.detach().clone()
    layer = student.model.layers[1].mlp.up_proj.weight.detach().clone()
    data = RecoveryData(RECORDS[:10], RECORDS[10:], text_dir=text_dir, teacher=teacher)
    params = kd_params(kd_freeze_embedding=True, max_steps=2, eval_steps=2)
    trained, result = recover(
        student, tokenizer, data, params, tmp_path / "resume", progress=False
    )
    assert torch.equal(trained.get_input_embeddings().weight, embedding)
    assert torch.equal(trained.get_output_embeddings().weight, head)
    assert not torch.equal(trained.model.layers[1].mlp.up_proj.weight, layer)
    frozen = embedding.numel() + (
        0 if student.config.tie_word_embeddings else head.numel()
    )
    assert result.trainable_params == count_params(trained) - frozen
    # as they were after: trainable again for whatever comes next
    assert trained.get_input_embeddings().weight.requires_grad
    assert trained.get_output_embeddings().weight.requires_grad


def test_distillation_resumes_bit_identically(student_and_teacher, text_dir, tmp_path):
    pruned_dir, teacher, tokenizer = student_and_teacher
    data = RecoveryData(RECORDS[:10], RECORDS[10:], text_dir=text_dir, teacher=teacher)
    params = kd_params()
    student, _ = load_model(pruned_dir)
    straight, _ = recover(
        student, tokenizer, data, params, tmp_path / "a", progress=False
    )
    student, _ = load_model(pruned_dir)
    recover(
        student,
        tokenizer,
        data,
        params,
        tmp_path / "b",
        callbacks=[StopAfter(4)],
        progress=False,
    )
    student, _ = load_model(pruned_dir)
    resumed, result = recover(
        student, tokenizer, data, params, tmp_path / "b", progress=False
    )
    assert result.resumed_from == 4
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_needs_its_teacher_and_text(student_and_teacher, tmp_path):
    pruned_dir, _, tokenizer = student_and_teacher
    student, _ = load_model(pruned_dir)
    with pytest.raises(DataError, match="needs the text folder"):
        recover(
            student,
            tokenizer,
            RecoveryData(RECORDS[:10], RECORDS[10:]),
            kd_params(),
            tmp_path,
            progress=False,
        )


def test_block_loss_is_relative_and_zero_on_the_teacher():
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    assert float(block_loss(states, states, [(0, 0), (2, 2)])) == 0.0
    scaled = [s * 10 for s in states]
    noisy = [s + 0.1 * torch.randn(s.shape, generator=g) for s in states]
    noisy_scaled = [s * 10 for s in noisy]
    # relative to the teacher's scale: the same error at 10x scale reads the same
    assert float(block_loss(noisy, states, [(1, 1)])) == pytest.approx(
        float(block_loss(noisy_scaled, scaled, [(1, 1)])), rel=1e-4
    )


def test_group_recovery_is_block_wise_then_global_distillation(
    tiny_model_dir, windows, text_dir, tmp_path
):
    teacher, tokenizer = load_model(tiny_model_dir)
    stats = collect_for(teacher, windows, 2, [], progress=False)
    plan = plan_from_scores(
        scores_from_stats(stats, [], 0, {}),
        layer_shapes(teacher),
        count_params(teacher),
        PruneParams(ratio=0.25, skip_first=1, skip_last=1, allocation="adaptive"),
    )
    groups = layer_groups(plan, 2)
    assert sorted(sum(groups, [])) == [0, 1, 2, 3]
    # the least important pruned layer leads the first group
    ranked = [e for e in plan.kept_layers() if e.layer_importance is not None]
    weakest = min(ranked, key=lambda e: e.layer_importance).index
    assert weakest in groups[0]
    student = prune_model(teacher, plan)
    held = pack(tokenizer, evaluation_documents(text_dir, "wiki"), 32)[:8]
    before = validation_kl(student, teacher, held)
    data = RecoveryData(RECORDS[:10], RECORDS[10:], text_dir=text_dir, teacher=teacher)
    trained, result = recover(
        student,
        tokenizer,
        data,
        kd_params(method="group", num_groups=2, max_steps=8),
        tmp_path / "resume",
        plan,
        progress=False,
    )
    # 2 groups x 2 steps of block-wise distillation, then 4 global steps
    assert result.steps == 8 and result.tokens == 8 * 4 * 32
    assert all(p.requires_grad for p in trained.parameters())
    assert validation_kl(trained, teacher, held) < before
    with pytest.raises(PruningError, match="kd_lora"):
        recover(
            prune_model(teacher, plan),
            tokenizer,
            data,
            kd_params(method="group", kd_lora=True),
            tmp_path / "again",
            plan,
            progress=False,
        )
