"""Knowledge distillation from the dense model: data, loss and the Trainer.

Data: plain text that no evaluation uses (the calibration halves of the C4
sample and the Wikipedia prose, and optionally the instruction sample as plain
text), with every word 13-gram that also occurs in evaluation text cut out
(:func:`decontaminate`), tokenized, joined with EOS between documents and cut
into full windows of ``seq_len`` tokens: no padding, every position carries a
target. A seeded slice of windows is held back for validation.

Loss (Hinton et al. 2015; Minitron recovers with the logit term only):
``alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE``,
averaged over every next-token position. With ``finetune.kd_topk`` the teacher
side is its top-k log-probabilities plus one "any other token" outcome
(:func:`topk_kd_loss`), computed once per teacher and window set and cached
(:func:`teacher_targets`), so the training step runs the student alone.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from saap.atomic import atomic_file
from saap.data import (
    DISTILLATION_ONLY_FILES,
    IN_DOMAIN_FILES,
    calibration_documents,
    distillation_only_documents,
    evaluation_documents,
)
from saap.errors import DataError
from saap.model import decoder_and_head
from saap.sources import sha256_of

log = logging.getLogger(__name__)

TEXT_CORPORA = ("c4", "wiki")


def distillation_documents(
    text_dir: Path | None,
    corpora: list[str],
    instruct_texts: list[str],
    teacher_text_dir: Path | None = None,
) -> list[str]:
    """Documents of the distillation corpus: the calibration half of each text
    corpus in ``corpora`` (never the evaluation half, never PTB), all of each
    distillation-only corpus named (``sciq``, ``mmlu``: sets no stage evaluates
    on), PTB's train split if ``ptb_train`` is named (PTB test is then
    in-domain: :func:`saap.data.in_domain_corpora`), if ``"instruct"`` is
    named, the instruction sample as plain text, and if ``"teacher"`` is named,
    the dense model's own samples (saap/teacher_text.py, in
    ``teacher_text_dir``)."""
    documents: list[str] = []
    for corpus in corpora:
        if corpus == "instruct":
            documents += instruct_texts
            continue
        if corpus == "teacher":
            from saap.teacher_text import teacher_documents

            documents += teacher_documents(teacher_text_dir)
            continue
        known = (*TEXT_CORPORA, *DISTILLATION_ONLY_FILES, *IN_DOMAIN_FILES)
        if corpus not in known:
            raise DataError(
                f"unknown distillation corpus {corpus!r}; known: "
                f"{[*known, 'instruct', 'teacher']} (PTB test and the evaluation "
                "halves are evaluation text)"
            )
        if text_dir is None:
            raise DataError(
                f"distillation corpus {corpus!r} needs the text folder "
                "(--text data/text)"
            )
        if corpus in TEXT_CORPORA:
            documents += calibration_documents(text_dir, corpus)
        else:
            documents += distillation_only_documents(text_dir, corpus)
    return documents


def pack(tokenizer, documents: list[str], seq_len: int) -> torch.Tensor:
    """Token ids of ``documents`` joined by EOS, cut into ``(N, seq_len)``
    windows (the tail shorter than one window is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids += encoded + [eos]
    count = len(ids) // seq_len
    if count == 0:
        raise DataError(
            f"the distillation text holds {len(ids)} tokens, less than one window "
            f"of {seq_len}; add corpora (finetune.kd_corpora) or lower cutoff_len"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def split_windows(
    windows: torch.Tensor, val_windows: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split into training and held-out validation windows."""
    if len(windows) <= val_windows:
        raise DataError(
            f"{len(windows)} distillation windows cannot leave {val_windows} for "
            "validation; lower finetune.val_size or add corpora"
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order[val_windows:]], windows[order[:val_windows]]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, KL term) over all positions; logits ``(B, T, V)``.

    The KL is per token, in nats, at temperature ``temperature`` and scaled by
    ``T^2`` so its gradients keep their size when T changes; ``labels`` (next
    token ids, already shifted) feed the cross-entropy term when ``alpha < 1``.
    """
    vocab = student_logits.shape[-1]
    s = (student_logits.float() / temperature).view(-1, vocab)
    t = (teacher_logits.float() / temperature).view(-1, vocab)
    kl = (
        F.kl_div(
            F.log_softmax(s, -1),
            F.log_softmax(t, -1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .mean()
        * temperature**2
    )
    return _with_lm_loss(kl, student_logits, labels, alpha)


# rows of logits per chunk of :func:`chunked_kd_loss`: 128 x 49,152 float32 is
# 25 MB, under glibc's largest mmap threshold (32 MB), so the chunk buffers are
# reused from the heap instead of being mapped, faulted in and unmapped anew
KD_CHUNK_ROWS = 128


class _ChunkedKD(torch.autograd.Function):
    """Output projection + a distillation loss in row chunks (see
    :func:`chunked_kd_loss`); the forward pass keeps the loss's gradient with
    respect to the logits, in the compute dtype, for the backward pass's two
    matmuls. ``teacher`` is ``("logits", hidden, weight)`` or ``("topk", logp,
    index)``."""

    @staticmethod
    def forward(ctx, hidden, weight, kind, t_a, t_b, labels, temperature, alpha):
        loss, kl, saved = _chunked_kd(
            hidden, weight, (kind, t_a, t_b), labels, temperature, alpha, True
        )
        ctx.save_for_backward(*saved)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(kl)
        return loss, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl):
        g, h, w = ctx.saved_tensors
        scale = grad_loss.float()
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (g @ w).to(ctx.dtypes[0]).mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_weight = (g.T @ h).to(ctx.dtypes[1]).mul_(scale)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _kl_rows_to_full_teacher(z, zt, temperature: float, coef, want_grad: bool):
    """One chunk of the full-teacher KL in a single pass per row: the KL's sum
    over the rows and, with ``want_grad``, ``coef * (softmax(z/T) -
    softmax(zt/T))`` in ``z``'s dtype. The same arithmetic as
    :func:`_teacher_logits_term` (float32 softmaxes); compiled by
    :func:`fused_kl_rows` so that the float32 log-softmaxes, the exponentials
    and the gradient never exist as separate (rows, V) tensors."""
    ls = torch.log_softmax(z.float() / temperature, -1)
    lt = torch.log_softmax(zt.float() / temperature, -1)
    pt = lt.exp()
    kl = (pt * (lt - ls)).sum()
    if not want_grad:
        return kl, None
    return kl, ((ls.exp() - pt) * coef).to(z.dtype)


# the compiled chunk step: "fn" once first asked for; "off" set where a
# compile failed (eager from then on); see fused_kl_rows
_FUSED: dict[str, object] = {}

# below this many logits per chunk the eager chunk step is used: compiling
# costs 2-18 s per shape (cached across runs), a tiny model gains nothing
FUSED_MIN_LOGITS = 1 << 20


def fused_kl_rows(rows: int, vocab: int):
    """:func:`_kl_rows_to_full_teacher` compiled by torch.compile (inductor's
    C++ kernels fuse the softmaxes, the KL and the gradient into passes over
    each row), or None where it does not pay or cannot run: chunks under
    ``FUSED_MIN_LOGITS`` logits, ``SAAP_KD_COMPILE=0``, or a machine whose
    first compile failed (no C++ compiler: the eager step is used from then on,
    with a warning). Measured in benchmarks/kd_throughput.py."""
    if rows * vocab < FUSED_MIN_LOGITS or os.environ.get("SAAP_KD_COMPILE") == "0":
        return None
    if _FUSED.get("off"):
        return None
    if "fn" not in _FUSED:
        _FUSED["fn"] = torch.compile(
            _kl_rows_to_full_teacher, dynamic=False, fullgraph=True
        )
    return _guarded(_FUSED, _kl_rows_to_full_teacher, _FUSED["fn"], "the kd loss")


def _guarded(state: dict, eager, compiled, what: str):
    """``compiled`` with ``eager`` as its fallback: the first failure (no C++
    compiler, an inductor error) warns once naming ``what``, sets
    ``state["off"]``, and from then on every call of any kernel of that state
    runs eager (the same arithmetic, slower)."""

    def call(*args):
        if state.get("off"):  # failed earlier (on another chunk or layer)
            return eager(*args)
        try:
            return compiled(*args)
        except Exception as exc:  # noqa: BLE001  (inductor raises many kinds)
            state["off"] = True
            log.warning(
                "torch.compile of %s failed (%s: %s); running it eager from now "
                "on (slower, same values to rounding)",
                what,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            return eager(*args)

    return call


# below this many parameters a model's decoder runs eager: compiling costs
# seconds per shape, a tiny model gains nothing
KERNELS_MIN_PARAMS = 20_000_000


def _rms_norm(x, weight, eps: float):
    """``LlamaRMSNorm.forward``'s arithmetic (float32 statistics)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _silu_gate(gate, up):
    """``LlamaMLP``'s ``act_fn(gate_proj(x)) * up_proj(x)`` for SiLU."""
    return F.silu(gate) * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(q, k, cos, sin):
    """``apply_rotary_pos_emb`` of transformers' LLaMA (``unsqueeze_dim=1``)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# the decoder's element-wise kernels: name -> (eager, compiled), filled when
# first asked for; "off" set where a compile failed (eager from then on)
_KERNELS: dict[str, object] = {}


def _decoder_kernels():
    """The compiled element-wise parts of a LLaMA decoder layer (RMSNorm, the
    SiLU gate, rotary embedding), each falling back to its eager arithmetic
    for good, with one warning, if a compile fails (no C++ compiler)."""
    if os.environ.get("SAAP_KD_COMPILE") == "0" or _KERNELS.get("off"):
        return None
    if not _KERNELS:
        for name, fn in (
            ("rms_norm", _rms_norm),
            ("silu_gate", _silu_gate),
            ("rotary", _rotary),
        ):
            # dynamic shapes: pruned layers differ in heads and MLP width
            _KERNELS[name] = (fn, torch.compile(fn, dynamic=True, fullgraph=True))

    return {
        name: _guarded(_KERNELS, *_KERNELS[name], "the decoder's element-wise kernels")
        for name in ("rms_norm", "silu_gate", "rotary")
    }


@contextlib.contextmanager
def compiled_decoder_kernels(*models):
    """While inside: the RMSNorms, SiLU gates and rotary embeddings of the
    given transformers LLaMA models (student and teacher, pruned widths
    included) run as inductor-compiled kernels, each a single pass where eager
    PyTorch makes 4-8 passes over (tokens, width) tensors and keeps each
    intermediate for backward. Same arithmetic (float32 statistics), values
    equal to rounding; the models' weights and state dicts are untouched and
    their own ``forward`` methods return on exit. Models under
    ``KERNELS_MIN_PARAMS`` parameters, ``SAAP_KD_COMPILE=0`` or a failed compile
    run eager. Measured in benchmarks/kd_throughput.py."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama import modeling_llama

    silu = (torch.nn.SiLU, SiLUActivation)  # "swish" and "silu" in ACT2FN
    big = [
        m
        for m in models
        if m is not None
        and sum(p.numel() for p in m.parameters()) >= KERNELS_MIN_PARAMS
    ]
    kernels = _decoder_kernels() if big else None
    if kernels is None:
        yield
        return
    patched = []
    for model in big:
        for module in model.modules():
            if "forward" in vars(module):  # patched by an enclosing context
                continue
            if isinstance(module, modeling_llama.LlamaRMSNorm):
                module.forward = functools.partial(
                    lambda m, h: kernels["rms_norm"](h, m.weight, m.variance_epsilon),
                    module,
                )
            elif isinstance(module, modeling_llama.LlamaMLP) and isinstance(
                module.act_fn, silu
            ):
                module.forward = functools.partial(
                    lambda m, x: m.down_proj(
                        kernels["silu_gate"](m.gate_proj(x), m.up_proj(x))
                    ),
                    module,
                )
            else:
                continue
            patched.append(module)
    rotary = modeling_llama.apply_rotary_pos_emb

    def compiled_rotary(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1:
            return rotary(q, k, cos, sin, unsqueeze_dim)
        return kernels["rotary"](q, k, cos, sin)

    if rotary.__name__ != "compiled_rotary":  # not already, by an enclosing one
        modeling_llama.apply_rotary_pos_emb = compiled_rotary
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = rotary
        for module in patched:
            del module.forward  # the class's own forward again


@contextlib.contextmanager
def frozen_token_embeddings(model, freeze: bool):
    """With ``freeze``: the input embedding and the output projection (one
    tied matrix in SmolLM2) not trained while inside, as they were after.
    Pruning never cuts them, so the student keeps the dense model's own
    vocabulary matrix and learns to reach its hidden states; the step skips the
    (V, H) weight gradient, its casts and its optimizer update."""
    weights = []
    if freeze:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            weight = getattr(module, "weight", None)
            if weight is not None and weight.requires_grad:
                weights.append(weight)
    for weight in weights:
        weight.requires_grad_(False)
    try:
        yield
    finally:
        for weight in weights:
            weight.requires_grad_(True)


def _teacher_logits_term(t_hidden, t_weight, scaled):
    """Per chunk: the KL to the teacher's full distribution (sum over rows) and,
    where wanted, its gradient with respect to the student's scaled logits,
    ``softmax(z/T) - softmax(zt/T)``; ``ls`` (the student's log-softmax) is
    used up."""

    def term(rows, ls, want_grad):
        lt = torch.log_softmax(scaled(t_hidden[rows] @ t_weight.T), -1)
        pt = lt.exp()
        kl = (pt * (lt - ls)).sum().double()
        return kl, ls.exp_().sub_(pt) if want_grad else None

    return term


def _teacher_topk_term(logp, index):
    """Per chunk: :func:`topk_kd_loss`'s KL over the teacher's top-k tokens and
    the tail (sum over rows) and, where wanted, its gradient with respect to the
    student's scaled logits: with ``p`` the student's probabilities, ``pt`` the
    teacher's top-k ones, ``P`` and ``S`` their sums over the k tokens and
    ``c`` the ratio of the tails (0 where the student's tail is at its floor),
    ``p (P - c S) + [token in top-k] (c p - pt)``; ``ls`` is used up."""

    def term(rows, ls, want_grad):
        lt, idx = logp[rows].float(), index[rows].long()
        pt = lt.exp()
        ls_k = ls.gather(-1, idx)
        p_k = ls_k.exp()
        teacher_mass, student_mass = pt.sum(-1), p_k.sum(-1)
        tail_t = (1 - teacher_mass).clamp_min(TAIL_FLOOR)
        tail_s_raw = 1 - student_mass
        tail_s = tail_s_raw.clamp_min(TAIL_FLOOR)
        head = (pt * (lt - ls_k)).sum(-1)
        kl = (head + tail_t * (tail_t.log() - tail_s.log())).sum().double()
        if not want_grad:
            return kl, None
        c = torch.where(tail_s_raw > TAIL_FLOOR, tail_t / tail_s, 0.0)
        grad = ls.exp_().mul_((teacher_mass - c * student_mass).unsqueeze(-1))
        grad.scatter_add_(-1, idx, c.unsqueeze(-1) * p_k - pt)
        return kl, grad

    return term


def _chunked_kd(hidden, weight, teacher, labels, temperature, alpha, want_grad):
    """(loss, kl, [grad wrt the logits, hidden, weight] in the compute dtype, or
    [] without ``want_grad``)."""
    n = hidden.shape[0]
    dtype = (
        torch.get_autocast_dtype("cpu")
        if torch.is_autocast_enabled("cpu")
        else hidden.dtype
    )

    def scaled(logits):  # never in place: z is read again for the LM loss
        logits = logits.float()
        return logits if temperature == 1.0 else logits / temperature

    with torch.autocast("cpu", enabled=False):
        w, h_all = weight.to(dtype), hidden.to(dtype)
        kind, t_a, t_b = teacher
        if kind == "logits":
            t_a, t_b = t_a.to(dtype), t_b.to(dtype)
            term = _teacher_logits_term(t_a, t_b, scaled)
        else:
            term = _teacher_topk_term(t_a.reshape(n, -1), t_b.reshape(n, -1))
        grad_logits = torch.empty(n, w.shape[0], dtype=dtype) if want_grad else None
        kl_sum = torch.zeros((), dtype=torch.float64)
        ce_sum = torch.zeros((), dtype=torch.float64)
        fused = (
            fused_kl_rows(min(KD_CHUNK_ROWS, n), w.shape[0])
            if kind == "logits" and alpha >= 1.0
            else None
        )
        for start in range(0, n, KD_CHUNK_ROWS):
            rows = slice(start, min(start + KD_CHUNK_ROWS, n))
            z = h_all[rows] @ w.T
            if fused is not None:
                # KL only (kd_alpha 1): the chunk in one compiled pass; the
                # gradient already carries alpha * T / n
                zt = t_a[rows] @ t_b.T
                # (the scale as a tensor: a new n does not recompile)
                coef = torch.tensor(alpha * temperature / n, dtype=torch.float32)
                kl_part, grad = fused(z, zt, float(temperature), coef, want_grad)
                kl_sum += kl_part.double()
                if want_grad:
                    grad_logits[rows] = grad
                continue
            ls = torch.log_softmax(scaled(z), -1)
            p1 = None
            if alpha < 1.0:
                l1 = ls if temperature == 1.0 else torch.log_softmax(z.float(), -1)
                target = labels[rows].reshape(-1, 1)
                ce_sum -= l1.gather(-1, target).sum().double()
                if want_grad:
                    # d/dz of (1 - alpha) * CE / n: softmax(z) - onehot
                    p1 = l1.exp()
                    p1.scatter_add_(-1, target, torch.full(target.shape, -1.0))
            # the KL's sum over the chunk's rows and, with want_grad, its
            # gradient with respect to z / T (ls is used up)
            kl_part, grad = term(rows, ls, want_grad)
            kl_sum += kl_part
            if not want_grad:
                continue
            # d/dz of alpha * T^2 * KL / n
            grad.mul_(alpha * temperature / n)
            if p1 is not None:
                grad.add_(p1, alpha=(1.0 - alpha) / n)
            grad_logits[rows] = grad
        kl = (kl_sum / n * temperature**2).float()
        loss = alpha * kl + (1 - alpha) * (ce_sum / n).float() if alpha < 1.0 else kl
    saved = [grad_logits, h_all, w] if want_grad else []
    return loss, kl.clone(), saved


def _chunked(hidden, weight, teacher, labels, temperature, alpha):
    if alpha < 1.0 and labels is None:
        raise ValueError("kd_alpha < 1 mixes in the LM loss: labels are needed")
    labels = labels.reshape(-1) if labels is not None else None
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedKD.apply(hidden, weight, *teacher, labels, temperature, alpha)
    loss, kl, _ = _chunked_kd(
        hidden, weight, teacher, labels, temperature, alpha, want_grad=False
    )
    return loss, kl


def chunked_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kd_loss` from the final hidden states ``(N, H)`` of student and
    teacher and their output projections ``(V, H)``, without the ``(N, V)``
    logits of either ever existing whole.

    The logits are formed ``KD_CHUNK_ROWS`` rows at a time; each chunk's loss
    and its gradient with respect to the logits,
    ``alpha*T*(softmax(z/T) - softmax(zt/T))/N`` plus
    ``(1-alpha)*(softmax(z) - onehot)/N``, are computed in the same pass; the
    gradient is kept in the compute dtype (one ``(N, V)`` tensor) for the
    backward pass's two matmuls through the projection. The same value as
    :func:`kd_loss` on the full logits (same matmuls in the autocast dtype,
    float32 softmaxes): the full-logit loss allocates, faults in and frees
    about a dozen float32 ``(N, V)`` tensors per step (1,020 x 49,152 is 200 MB
    each), which on 2 CPU cores costs more than the projection's matmuls.
    """
    teacher = ("logits", teacher_hidden, teacher_weight)
    return _chunked(hidden, weight, teacher, labels, temperature, alpha)


def chunked_topk_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_index: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_kd_loss` from the student's final hidden states ``(N, H)``
    and output projection ``(V, H)`` against the cached top-k targets
    (``(N, k)`` log-probabilities and token ids), in row chunks as
    :func:`chunked_kd_loss`: the student's ``(N, V)`` logits never exist
    whole."""
    teacher = ("topk", teacher_logp, teacher_index)
    return _chunked(hidden, weight, teacher, labels, temperature, alpha)


def distillation_loss(
    student,
    teacher,
    ids: torch.Tensor,
    temperature: float,
    alpha: float,
    autocast=contextlib.nullcontext,
    teacher_hidden: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, KL) of the ``kd`` recovery's step on token windows ``ids``: the
    student's final hidden states under ``autocast()``, then the loss on its
    output projection in row chunks, so the ``(B, T, V)`` logits never exist
    whole. The teacher is one of:

    - ``teacher_topk``: cached top-k targets (``finetune.kd_topk``,
      :func:`teacher_targets`: log-probabilities and token ids, ``(B, T - 1,
      k)`` each), :func:`chunked_topk_kd_loss`, no teacher pass;
    - ``teacher_hidden``: its final hidden states of the same ``ids``
      (:func:`teacher_final_hidden`), :func:`chunked_kd_loss` with its output
      projection;
    - neither: its final hidden states computed here, without gradients."""
    decoder, head = decoder_and_head(student, required=True)
    if teacher_topk is None:
        t_head = decoder_and_head(teacher, required=True)[1]
        if teacher_hidden is None:
            teacher_hidden = teacher_final_hidden(teacher, ids)
    with autocast():
        hidden = decoder(input_ids=ids).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if teacher_topk is not None:
            logp, index = teacher_topk
            k = logp.shape[-1]
            return chunked_topk_kd_loss(
                hidden,
                head.weight,
                logp.reshape(-1, k),
                index.reshape(-1, k),
                ids[:, 1:],
                temperature,
                alpha,
            )
        return chunked_kd_loss(
            hidden,
            head.weight,
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            t_head.weight,
            ids[:, 1:],
            temperature,
            alpha,
        )


def teacher_final_hidden(teacher, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's final hidden states ``(B, T - 1, H)`` at the positions
    that predict a next token, without gradients."""
    t_decoder = decoder_and_head(teacher, required=True)[0]
    with torch.no_grad():
        return t_decoder(input_ids=ids).last_hidden_state[:, :-1]


def _with_lm_loss(kl, student_logits, labels, alpha: float):
    """(alpha * kl + (1 - alpha) * CE(student, labels), kl); the KL alone when
    ``alpha`` is 1 or there are no labels."""
    if alpha >= 1.0 or labels is None:
        return kl, kl
    vocab = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.float().reshape(-1, vocab), labels.reshape(-1))
    return alpha * kl + (1 - alpha) * ce, kl


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_index: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kd_loss` against the teacher's top-k log-probabilities
    ``teacher_logp`` (at ``temperature``) of the tokens ``teacher_index``,
    ``(B, T, k)`` each, instead of its full logits.

    The KL is the exact KL between the two distributions coarsened to k + 1
    outcomes: the k teacher tokens and "any other token" (the teacher's tail
    mass against the student's). It equals the full KL when k is the vocabulary
    and is never above it (coarsening cannot increase a KL divergence).
    """
    vocab = student_logits.shape[-1]
    k = teacher_logp.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, -1)
    lt = teacher_logp.float().reshape(-1, k)
    ls = s.gather(-1, teacher_index.reshape(-1, k).long())
    pt = lt.exp()
    head = (pt * (lt - ls)).sum(-1)
    tail_t = (1 - pt.sum(-1)).clamp_min(TAIL_FLOOR)
    tail_s = (1 - ls.exp().sum(-1)).clamp_min(TAIL_FLOOR)
    kl = (head + tail_t * (tail_t.log() - tail_s.log())).mean() * temperature**2
    return _with_lm_loss(kl, student_logits, labels, alpha)


TAIL_FLOOR = 1e-6


def weights_digest(model) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a model's state."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TeacherTargets:
    """The teacher's top-k next-token log-probabilities of a set of windows,
    ``(N, L - 1, k)`` float32 log-probs and int32 token ids, row i belonging to
    window i."""

    logp: torch.Tensor
    index: torch.Tensor
    computed: bool = True  # False: loaded from the cache

    def rows(self, positions: torch.Tensor) -> TeacherTargets:
        return TeacherTargets(
            self.logp[positions], self.index[positions], self.computed
        )


def teacher_targets(
    teacher,
    windows: torch.Tensor,
    k: int,
    temperature: float,
    cache_dir: Path | None,
    batch_size: int = 8,
) -> TeacherTargets:
    """Top-k log-probabilities of ``teacher`` on ``windows``, computed once and
    kept under ``cache_dir/teacher-topk/<key>.safetensors`` where the key hashes
    the teacher's weights, the windows, k, the temperature and the torch
    version. A cached file is used only when its recorded sha256 matches; one
    that does not is computed again and replaced."""
    from safetensors.torch import load_file, save_file

    vocab = teacher.config.vocab_size
    if not 0 < k <= vocab:
        raise DataError(
            f"finetune.kd_topk {k} must be between 1 and the vocabulary size "
            f"{vocab}; e.g. kd_topk: 64, or null for the full KL"
        )
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(
            "|".join(
                [
                    weights_digest(teacher),
                    hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
                    str(tuple(windows.shape)),
                    str(k),
                    repr(float(temperature)),
                    torch.__version__,
                ]
            ).encode()
        ).hexdigest()[:32]
        path = cache_dir / "teacher-topk" / f"{key}.safetensors"
        recorded = path.with_suffix(".sha256")
        if path.is_file() and recorded.is_file():
            if sha256_of(path) == recorded.read_text().strip():
                tensors = load_file(path)
                log.info("teacher top-%d targets from the cache: %s", k, path)
                return TeacherTargets(tensors["logp"], tensors["index"], False)
            log.warning("teacher cache %s does not match its sha256; recomputing", path)
    was_training = teacher.training
    teacher.eval()
    logps, indices = [], []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            logits = teacher(input_ids=windows[start : start + batch_size]).logits
            logp = F.log_softmax(logits[:, :-1].float() / temperature, -1)
            values, index = logp.topk(k, dim=-1)
            logps.append(values)
            indices.append(index.to(torch.int32))
    teacher.train(was_training)
    targets = TeacherTargets(torch.cat(logps), torch.cat(indices))
    if path is not None:
        with atomic_file(path) as tmp:
            save_file({"logp": targets.logp, "index": targets.index}, str(tmp))
            digest = sha256_of(tmp)
        with atomic_file(path.with_suffix(".sha256")) as tmp:
            tmp.write_text(digest + "\n")
        log.info("teacher top-%d targets cached: %s", k, path)
    return targets


class WindowDataset(torch.utils.data.Dataset):
    """Token windows, with the teacher's top-k targets of each when given."""

    def __init__(
        self, windows: torch.Tensor, targets: TeacherTargets | None = None
    ) -> None:
        if targets is not None and len(targets.logp) != len(windows):
            raise ValueError(
                f"{len(targets.logp)} teacher targets for {len(windows)} windows"
            )
        self.windows = windows
        self.targets = targets

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.windows[index]}
        if self.targets is not None:
            item["teacher_logp"] = self.targets.logp[index]
            item["teacher_index"] = self.targets.index[index]
        return item


def collate_windows(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([b[key] for b in batch]) for key in batch[0]}


def _objective_on_held_out(self, model, inputs, prediction_loss_only, ignore_keys=None):
    """A Trainer's ``prediction_step`` whose validation loss is the training
    objective on held-out windows."""
    with torch.no_grad():
        loss = self.compute_loss(model, inputs)
    return loss.detach(), None, None


def distill_trainer_class():
    """A ``transformers.Trainer`` whose loss is distillation from a frozen teacher
    (built lazily: transformers is imported only when distilling)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def __init__(self, *args, teacher, temperature, alpha, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
            self.temperature = temperature
            self.alpha = alpha
            # validation batch (shape, token digest) -> teacher hidden states
            self.held_out_teacher: dict = {}

        def compute_loss(
            self, model, inputs, return_outputs=False, num_items_in_batch=None
        ):
            ids = inputs["input_ids"]
            # cached top-k targets where the data set has them: no teacher pass
            topk = (
                (inputs["teacher_logp"], inputs["teacher_index"])
                if "teacher_logp" in inputs
                else None
            )
            loss, kl = distillation_loss(
                model,
                self.teacher,
                ids,
                self.temperature,
                self.alpha,
                self.accelerator.autocast,
                teacher_hidden=inputs.get("teacher_hidden"),
                teacher_topk=topk,
            )
            return (loss, {"kl": kl}) if return_outputs else loss

        def prediction_step(
            self, model, inputs, prediction_loss_only, ignore_keys=None
        ):
            """The training objective on held-out windows; the teacher's
            hidden states of each validation batch are computed at the first
            evaluation and kept (the frozen teacher gives the same ones every
            time), so later evaluations run the student alone."""
            ids = inputs["input_ids"]
            if "teacher_logp" not in inputs:
                key = (
                    tuple(ids.shape),
                    hashlib.sha256(ids.cpu().contiguous().numpy().tobytes()).digest(),
                )
                if key not in self.held_out_teacher:
                    self.held_out_teacher[key] = teacher_final_hidden(self.teacher, ids)
                inputs = {**inputs, "teacher_hidden": self.held_out_teacher[key]}
            return _objective_on_held_out(self, model, inputs, prediction_loss_only)

    return DistillTrainer


def block_loss(student_states, teacher_states, pairs) -> torch.Tensor:
    """Mean over ``pairs`` (student layer position, teacher layer index) of the
    squared error between the layers' output hidden states, relative to the
    teacher state's mean square (so every depth weighs alike)."""
    total = 0.0
    for position, index in pairs:
        student = student_states[position + 1].float()
        target = teacher_states[index + 1].float()
        total = total + (student - target).square().mean() / target.square().mean()
    return total / len(pairs)


def block_trainer_class():
    """A ``transformers.Trainer`` whose loss is block-wise distillation: the
    hidden states at the outputs of the given layers, each computed from the
    student's own input, against the frozen teacher's."""
    from transformers import Trainer

    class BlockTrainer(Trainer):
        def __init__(self, *args, teacher, pairs, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
            self.pairs = list(pairs)

        def compute_loss(
            self, model, inputs, return_outputs=False, num_items_in_batch=None
        ):
            ids = inputs["input_ids"]
            with torch.no_grad():
                target = self.teacher(input_ids=ids, output_hidden_states=True)
            outputs = model(input_ids=ids, output_hidden_states=True)
            loss = block_loss(outputs.hidden_states, target.hidden_states, self.pairs)
            return (loss, outputs) if return_outputs else loss

        prediction_step = _objective_on_held_out

    return BlockTrainer


def word_ngrams(text: str, n: int) -> set[int]:
    """Hashes of the lower-cased word ``n``-grams of ``text``."""
    words = text.lower().split()
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def shared_ngrams(train: list[str], evaluation: list[str], n: int = 13) -> int:
    """How many word ``n``-grams of the training documents also occur in the
    evaluation documents (13 words: the contamination test of GPT-3's paper)."""
    seen: set[int] = set()
    for text in evaluation:
        seen |= word_ngrams(text, n)
    return sum(len(word_ngrams(text, n) & seen) for text in train)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def evaluation_texts(text_dir: Path | None, eval_dir: Path | None) -> list[str]:
    """Every text the evaluation reads: PTB test, the evaluation halves of C4
    and Wikipedia, and every string of every zero-shot task record."""
    texts: list[str] = []
    if text_dir is not None:
        for corpus in ("ptb", "c4", "wiki"):
            texts += evaluation_documents(text_dir, corpus)
    if eval_dir is not None:
        for path in sorted(Path(eval_dir).glob("*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    texts.append(" ".join(_strings(json.loads(line))))
    return texts


def decontaminate(
    train: list[str], evaluation: list[str], n: int = 13
) -> tuple[list[str], int]:
    """Cut every word ``n``-gram shared with ``evaluation`` out of the training
    documents (as GPT-3's decontamination did): a document with such n-grams is
    split into the runs of words around them. Returns the documents and the
    number of words removed."""
    seen: set[int] = set()
    for text in evaluation:
        seen |= word_ngrams(text, n)
    out: list[str] = []
    removed = 0
    for doc in train:
        words = doc.split()
        lower = [w.lower() for w in words]
        hits = [
            i
            for i in range(len(words) - n + 1)
            if hash(tuple(lower[i : i + n])) in seen
        ]
        if not hits:
            out.append(doc)
            continue
        cut = [False] * len(words)
        for i in hits:
            cut[i : i + n] = [True] * n
        removed += sum(cut)
        run: list[str] = []
        for word, drop in zip(words, cut, strict=True):
            if drop:
                if run:
                    out.append(" ".join(run))
                run = []
            else:
                run.append(word)
        if run:
            out.append(" ".join(run))
    return out, removed
