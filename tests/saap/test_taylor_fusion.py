"""Group reductions and the uncertainty fusion: golden numbers and invariances."""

from __future__ import annotations

import pytest
import torch

from saap.fusion import fuse, jackknife_sigma
from saap.importance.estimators import ESTIMATORS
from saap.importance.taylor import gradient_atoms, groups_from_atoms, reduce_groups

pytestmark = pytest.mark.unit


def layer_tensors(value: float = 0.0) -> dict[str, torch.Tensor]:
    # H=4, KV=2, hd=2, hidden=3, I=5
    return {
        "q": torch.full((8, 3), value),
        "k": torch.full((4, 3), value),
        "v": torch.full((4, 3), value),
        "o": torch.full((3, 8), value),
        "gate": torch.full((5, 3), value),
        "up": torch.full((5, 3), value),
        "down": torch.full((3, 5), value),
    }


def test_reduce_groups_sums_each_coupled_structure():
    salience = layer_tensors(1.0)
    scores = reduce_groups(salience, num_kv_heads=2, head_dim=2)
    # a query head: 2 rows x 3 of q + 3 x 2 columns of o = 12 ones
    assert scores["q_head"].tolist() == [12.0] * 4
    # a kv group: 2 query heads (24) + 2 rows x 3 of k and of v (12) = 36
    assert scores["kv_group"].tolist() == [36.0, 36.0]
    # an MLP channel: a row of gate (3) + of up (3) + a column of down (3) = 9
    assert scores["mlp"].tolist() == [9.0] * 5


def test_reduce_groups_locates_rows_and_columns():
    salience = layer_tensors(0.0)
    salience["q"][2:4] = 1.0  # rows of query head 1
    salience["o"][:, 6:8] = 2.0  # columns of query head 3
    salience["down"][:, 4] = 5.0  # channel 4
    scores = reduce_groups(salience, num_kv_heads=2, head_dim=2)
    assert scores["q_head"].tolist() == [0.0, 6.0, 0.0, 12.0]
    # head 1 is in kv group 0 (heads 0,1), head 3 in group 1 (heads 2,3)
    assert scores["kv_group"].tolist() == [6.0, 12.0]
    assert scores["mlp"].tolist() == [0.0, 0.0, 0.0, 0.0, 15.0]


def test_vector_score_cancels_signs_element_score_does_not():
    salience = layer_tensors(0.0)
    salience["gate"][0] = torch.tensor([1.0, -1.0, 0.5])
    vector = reduce_groups(salience, 2, 2, torch.abs)["mlp"]
    element = reduce_groups({k: v.abs() for k, v in salience.items()}, 2, 2)["mlp"]
    assert vector[0] == pytest.approx(0.5)  # |1 - 1 + 0.5|
    assert element[0] == pytest.approx(2.5)  # 1 + 1 + 0.5


def leave_one_out(per_window: torch.Tensor) -> torch.Tensor:
    """Jackknife replicates of a mean over windows: (N, n) -> (N, n)."""
    count = per_window.shape[0]
    return (per_window.sum(0, keepdim=True) - per_window) / (count - 1)


def test_jackknife_sigma_is_zero_on_identical_windows_grows_with_noise():
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1, 50, generator=generator) + 0.5
    eps = torch.randn(16, 50, generator=generator)
    sigmas = [
        jackknife_sigma(leave_one_out(base * (1 + level * eps)))
        for level in (0.0, 0.01, 0.1, 0.3)
    ]
    assert sigmas[0] == pytest.approx(0.0, abs=1e-9)
    assert sigmas[1] < sigmas[2] < sigmas[3]
    # the standard error of the mean of N windows: ~ level / sqrt(N) here
    assert sigmas[2] == pytest.approx(0.1 / 16**0.5, rel=0.3)
    noisy = leave_one_out(base * (1 + 0.1 * eps))
    assert jackknife_sigma(noisy * 1000) == pytest.approx(
        jackknife_sigma(noisy), rel=1e-6
    )


@pytest.mark.parametrize("scale", ["mean", "rank"])
def test_fused_ranking_is_the_certain_metrics_when_the_other_is_noise(scale):
    generator = torch.Generator().manual_seed(3)
    windows, groups = 32, 60
    signal = torch.linspace(1.0, 2.0, groups)[
        torch.randperm(groups, generator=generator)
    ]
    certain = signal * (1 + 0.01 * torch.randn(windows, groups, generator=generator))
    # a first-order score of pure noise: |mean of zero-mean per-window terms|
    noise = torch.randn(windows, groups, generator=generator)
    scores = {"certain": certain.mean(0), "noise": noise.mean(0).abs()}
    sigmas = {
        "certain": jackknife_sigma(leave_one_out(certain), scale),
        "noise": jackknife_sigma(leave_one_out(noise).abs(), scale),
    }
    assert sigmas["certain"] < 0.05 < 0.2 < sigmas["noise"]
    fused = fuse(scores, sigmas, scale)
    assert torch.equal(fused.argsort(), scores["certain"].argsort())
    # and rescaling either metric changes nothing
    rescaled = fuse(
        {"certain": scores["certain"] * 1e3, "noise": scores["noise"] * 1e-3},
        sigmas,
        scale,
    )
    assert torch.equal(rescaled.argsort(), fused.argsort())


def test_vector_score_per_row_as_llm_pruner_code_or_per_group():
    weights = layer_tensors(1.0)
    grads = layer_tensors(0.0)
    # MLP channel 0: its gate row sums to +1.5, its up row to -1.5
    grads["gate"][0] = torch.tensor([1.0, -1.0, 1.5])
    grads["up"][0] = torch.tensor([-1.5, 0.0, 0.0])
    per_row = ESTIMATORS["taylor_vector"].index_fn
    per_group = ESTIMATORS["taylor_vector_group"].index_fn
    row = groups_from_atoms(gradient_atoms(per_row, weights, grads, 2), 2)
    group = groups_from_atoms(
        gradient_atoms(per_group, weights, grads, 2), 2, torch.abs
    )
    assert row["mlp"][0] == pytest.approx(3.0)  # |1.5| + |-1.5|
    assert group["mlp"][0] == pytest.approx(0.0)  # |1.5 - 1.5|


def test_fused_ranking_survives_rescaling_a_metric_plain_sum_does_not():
    generator = torch.Generator().manual_seed(1)
    vector = torch.rand(40, generator=generator)
    element = torch.rand(40, generator=generator)
    sigmas = {"vector": 0.5, "element": 0.2}
    fused = fuse({"vector": vector, "element": element}, sigmas)
    rescaled = fuse({"vector": vector * 1e4, "element": element}, sigmas)
    assert torch.equal(fused.argsort(), rescaled.argsort())
    plain = vector + element
    plain_rescaled = vector * 1e4 + element
    assert not torch.equal(plain.argsort(), plain_rescaled.argsort())


def test_fusion_weights_follow_uncertainty():
    # metric a is certain (small sigma): the fused order follows a, not b
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([3.0, 2.0, 1.0])
    fused = fuse({"a": a, "b": b}, {"a": 0.1, "b": 1.0})
    assert fused.argsort().tolist() == [0, 1, 2]


def test_jackknife_needs_two_windows():
    with pytest.raises(ValueError, match="at least 2 calibration windows"):
        jackknife_sigma(torch.ones(1, 5))


def test_rank_scale_keeps_a_heavy_tailed_metric_whose_ordering_is_stable():
    """A few outlier groups whose values swing with the windows inflate the
    mean-scale sigma; their ranks (and everyone else's) do not move, so the rank
    scale gives the metric its weight back."""
    generator = torch.Generator().manual_seed(5)
    windows, groups = 16, 80
    base = torch.linspace(1.0, 2.0, groups)[torch.randperm(groups, generator=generator)]
    base[:3] = torch.tensor([200.0, 300.0, 400.0])
    swing = torch.ones(windows, groups)
    swing[:, :3] = 1 + 0.9 * torch.rand(windows, 3, generator=generator)
    heavy = (
        base * swing * (1 + 1e-4 * torch.randn(windows, groups, generator=generator))
    )
    replicates = leave_one_out(heavy)
    assert jackknife_sigma(replicates, "mean") > 0.1
    assert jackknife_sigma(replicates, "rank") < 0.01


def test_rank_scale_is_unchanged_by_a_monotone_transform():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.rand(30, generator=generator), torch.rand(30, generator=generator)
    sigmas = {"a": 0.1, "b": 0.3}
    fused = fuse({"a": a, "b": b}, sigmas, "rank")
    transformed = fuse({"a": a.pow(3) * 7, "b": b.exp()}, sigmas, "rank")
    assert torch.equal(fused, transformed)
    assert not torch.equal(
        fuse({"a": a, "b": b}, sigmas).argsort(),
        fuse({"a": a.pow(3) * 7, "b": b.exp()}, sigmas).argsort(),
    )


def test_unknown_fusion_scale_is_named():
    with pytest.raises(ValueError, match="unknown fusion scale 'median'"):
        fuse({"a": torch.ones(3)}, {"a": 0.1}, "median")
