"""The comparison's method table (:data:`METHODS`): how each published method
scores, allocates and recovers, expressed in this project's estimators and
allocations. ``compare.methods`` in params.yaml names its entries (plus
``dense``, the unpruned reference). Adding a method is one ``METHODS.add`` line
here plus its test; its estimator and allocation come from their registries."""

from __future__ import annotations

from dataclasses import dataclass

from saap.errors import PruningError
from saap.importance.estimators import ESTIMATORS
from saap.iterative import stepped_plan
from saap.model import count_params, layer_shapes
from saap.params import CompareParams, PruneParams
from saap.plan import Plan, one_shot_plan
from saap.prune import record_compensation
from saap.registry import Registry


@dataclass(frozen=True)
class Method:
    """How one method scores, allocates and recovers (see docs/results.md)."""

    label: str
    importance: str
    allocation: str
    bias_compensation: bool = False
    least_squares: bool = False
    # recovery methods (saap/recovery.py) run for it when compare.recover names it
    recoveries: tuple[str, ...] = ("lora",)

    @property
    def fused(self) -> bool:
        """Scored by SAAP's fusion (a derived estimator): SAAP's arms prune in
        the prune section's steps (prune.iterations, prune.max_step_ratio), the
        published methods in one shot."""
        name = self.importance
        return name in ESTIMATORS and ESTIMATORS[name].derived


METHODS: Registry[Method] = Registry("comparison method", "saap/methods.py")

METHODS.add("random", Method("Random", "random", "uniform"))
METHODS.add(
    "llm_pruner_vector", Method("LLM-Pruner vector", "taylor_vector", "uniform")
)
METHODS.add(
    "llm_pruner_element1", Method("LLM-Pruner element1", "taylor_element1", "uniform")
)
METHODS.add(
    "llm_pruner_element2", Method("LLM-Pruner element2", "taylor_element2", "uniform")
)
METHODS.add("flap", Method("FLAP", "flap", "global", bias_compensation=True))
# FLAP's scores and allocation with the compensation SAAP's default uses (the
# sequential least-squares refit): separates scores and allocation from the
# compensation (benchmarks/saap_variants.py measured it as the strongest baseline)
METHODS.add(
    "flap_ls",
    Method("FLAP + least squares", "flap", "global", least_squares=True),
)
METHODS.add("wanda_sp", Method("Wanda-sp", "wanda_sp", "uniform"))
# whole layers of lowest block influence; the remainder below one layer is filled
# with MLP channels by taylor_element1 (so the budget is met exactly)
METHODS.add("shortgpt", Method("ShortGPT", "taylor_element1", "layers"))
METHODS.add("saap", Method("SAAP", "saap", "adaptive", recoveries=("group", "lora")))
# SAAP with FLAP's bias compensation: the part that decides 50% (see
# docs/results.md, benchmarks/ablate_allocation.py)
METHODS.add(
    "saap_bc",
    Method("SAAP + bias comp.", "saap", "adaptive", bias_compensation=True),
)
# SAAP with the least-squares refit of the kept o_proj/down_proj columns and bias
METHODS.add(
    "saap_ls",
    Method("SAAP + least squares", "saap", "adaptive", least_squares=True),
)


def recovery_methods(method: str, params: CompareParams) -> list[str]:
    """Fine-tuning methods run for ``method``: none, LoRA, or group + LoRA."""
    if method not in params.recover or method == "dense":
        return []
    return list(METHODS[method].recoveries)


def arm_importance(spec: Method, prune: PruneParams) -> str:
    """The estimator an arm scores with: SAAP's arms fuse as the prune section
    does (``saap`` on the mean scale or ``saap_rank``, with its saap_metrics:
    the pipeline's default), a published method uses its own estimator."""
    own = prune.importance
    if spec.fused and own in ESTIMATORS and ESTIMATORS[own].derived:
        return own
    return spec.importance


def prune_params_for(method: str, ratio: float, base: PruneParams) -> PruneParams:
    """The prune section of an arm: the project's structure settings (skipped
    layers, attention unit, spread) with the method's scores and allocation."""
    spec = METHODS[method]
    return base.model_copy(
        update={
            "ratio": ratio,
            "importance": arm_importance(spec, base),
            "allocation": spec.allocation,
            "bias_compensation": spec.bias_compensation,
            "least_squares": spec.least_squares,
            "ppl_bound": None,
        }
        | ({} if spec.fused else {"iterations": 1, "max_step_ratio": None})
    )


def default_method(prune: PruneParams) -> str | None:
    """The comparison method whose scores, allocation and compensation are those
    of the ``prune`` section (the pipeline's default), or None if none is."""
    for name, spec in METHODS.items():
        if (
            arm_importance(spec, prune) == prune.importance
            and spec.allocation == prune.allocation
            and spec.bias_compensation == prune.bias_compensation
            and spec.least_squares == prune.least_squares
        ):
            return name
    return None


def build_arm_plan(
    scores, shapes, total: int, params: PruneParams, measure_sensitivity=None
) -> Plan:
    """The plan; if MLP channels alone cannot remove ``ratio`` (50% of SmolLM2
    with its first and last layers kept), attention heads are pruned as well, the
    same rule for every method, recorded in the plan."""
    plan, params = one_shot_plan(
        scores, shapes, total, params, True, measure_sensitivity
    )
    plan.prune_attention = params.prune_attention
    record_compensation(plan, params)
    return plan


def arm_plan(
    model,
    params: PruneParams,
    scores,
    windows=None,
    holdout=None,
    batch_size: int = 4,
    progress: bool = False,
    per_window: str = "stored",
    refit_windows=None,
) -> Plan:
    """A method's plan as the prune stage builds it: in ``params.steps`` steps
    (re-scored between, refit between where ``params`` compensate) where the
    params ask for more than one, else in one shot; either way with the
    attention fallback of :func:`build_arm_plan`. ``windows`` (and ``holdout``,
    for a chosen ridge): the calibration windows the scores came from;
    ``refit_windows``: what the refit between steps fits on (default
    ``windows``; saap.calibration.fit_windows)."""
    if params.steps > 1:
        if windows is None:
            raise PruningError(
                f"pruning {params.ratio:.0%} in {params.steps} steps re-scores on "
                "the calibration windows: pass them (or set prune.max_step_ratio "
                "to null for one shot)"
            )
        return stepped_plan(
            model,
            params,
            windows,
            scores,
            batch_size,
            holdout,
            progress=progress,
            attention_fallback=True,
            per_window=per_window,
            refit_windows=refit_windows,
        )
    return build_arm_plan(scores, layer_shapes(model), count_params(model), params)


def pruning_label(method: str, params: PruneParams) -> str:
    """``method``, with its number of steps where it prunes in more than one."""
    return method if params.steps == 1 else f"{method}, {params.steps} steps"


def kept_fractions(plan: Plan) -> list[float]:
    """Per layer, the fraction of its parameters kept (0 for a removed layer)."""
    return [1.0 - (1.0 if e.removed else e.ratio) for e in plan.layers]
