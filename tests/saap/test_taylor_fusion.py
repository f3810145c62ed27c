"""Group reductions and the uncertainty fusion: golden numbers and invariances."""

from __future__ import annotations

import pytest
import torch

from saap.fusion import fuse, metric_sigma
from saap.importance.taylor import reduce_groups

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


def test_sigma_is_scale_free_and_grows_with_noise():
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1, 50, generator=generator) + 0.5
    quiet = base * (1 + 0.01 * torch.randn(6, 50, generator=generator))
    noisy = base * (1 + 0.3 * torch.randn(6, 50, generator=generator)).abs()
    assert metric_sigma(quiet) < metric_sigma(noisy)
    assert metric_sigma(quiet * 1000) == pytest.approx(metric_sigma(quiet), rel=1e-6)


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


def test_sigma_needs_two_batches():
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        metric_sigma(torch.ones(1, 5))
