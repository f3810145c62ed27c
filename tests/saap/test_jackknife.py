"""The per-window pass on the tiny fixture: the Fisher diagonal from per-window
gradients, and jackknife replicates that are the fused estimators themselves."""

from __future__ import annotations

import pytest
import torch

from saap.errors import DataError, PruningError
from saap.fusion import jackknife_sigma
from saap.importance import stats as stats_module
from saap.importance.estimators import collect_for, jackknifed, with_fusion_inputs
from saap.importance.stats import collect_statistics, layer_projections
from saap.model import load_model
from saap.scores import scores_from_stats

pytestmark = pytest.mark.unit

FUSABLE = [
    "taylor_vector",
    "taylor_vector_group",
    "taylor_element1",
    "wanda_sp",
    "flap",
]


def scores_of(model, windows, names):
    stats = collect_for(model, windows, 3, names, progress=False)
    return scores_from_stats(stats, names, 0, {"num_layers": len(stats.layers)})


def test_fusable_estimators_give_replicates():
    assert all(jackknifed(n) for n in FUSABLE)
    assert not any(jackknifed(n) for n in ("magnitude", "random", "taylor_element2"))


def test_fisher_is_the_mean_of_per_window_squared_gradients(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    stats = collect_for(model, windows, 3, ["taylor_element2"], progress=False)
    # by hand: one backward per window
    layer = model.model.layers[1]
    params = layer_projections(layer)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    for window in windows.split(1):
        model.zero_grad(set_to_none=True)
        model(input_ids=window, labels=window).loss.backward()
        for n, p in params.items():
            expected[n] += p.grad.square() / windows.shape[0]
    for n in params:
        assert torch.allclose(stats.layers[1].fisher[n], expected[n], rtol=1e-4)
    # not the square of batch-mean gradients
    assert not torch.allclose(
        stats.layers[1].fisher["gate"], stats.grads[1]["gate"].square(), rtol=0.1
    )


@pytest.mark.parametrize("name", FUSABLE)
def test_replicate_is_the_estimator_without_that_window(tiny_model_dir, windows, name):
    model, _ = load_model(tiny_model_dir)
    full = scores_of(model, windows, [name])
    left_out = 2
    rest = torch.cat([windows[:left_out], windows[left_out + 1 :]])
    without = scores_of(model, rest, [name])
    for layer in range(len(full.scores[name])):
        for kind, replicates in full.replicates[name][layer].items():
            assert replicates.shape[0] == windows.shape[0]
            expected = without.scores[name][layer][kind]
            assert torch.allclose(
                replicates[left_out], expected, rtol=1e-3, atol=1e-6
            ), (name, layer, kind)


def test_sigma_is_zero_on_identical_windows(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    same = windows[:1].repeat(6, 1)
    scores = scores_of(model, same, FUSABLE)
    varied = scores_of(model, windows, FUSABLE)
    for name in FUSABLE:
        for kind in ("q_head", "mlp"):
            stacked = torch.cat([r[kind] for r in scores.replicates[name]], 1)
            assert jackknife_sigma(stacked) == pytest.approx(0.0, abs=1e-3), name
            spread = torch.cat([r[kind] for r in varied.replicates[name]], 1)
            assert jackknife_sigma(spread) > 1e-2, name
    for fusion in ("saap", "saap_rank"):
        _, details = scores.estimate(fusion, FUSABLE)
        assert all(s < 1e-3 for s in details["sigmas"]["mlp"].values()), fusion


def _per_window_stats(model, windows, per_window):
    from saap.importance.estimators import jackknife_functions

    return collect_statistics(
        model,
        windows,
        3,
        want_fisher=True,
        progress=False,
        jackknife=jackknife_functions(FUSABLE),
        per_window=per_window,
    )


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_stored_activations_give_the_second_pass_statistics(request, windows, fixture):
    """Per-window gradients formed from the batched pass's kept inputs and output
    gradients equal those of a second forward and backward per window (biases
    included), up to float32 rounding."""
    model, _ = load_model(request.getfixturevalue(fixture))
    qkv_bias = fixture == "tiny_qwen_dir"
    stored = _per_window_stats(model, windows, "stored")
    second = _per_window_stats(model, windows, "second_pass")
    assert stored.num_samples == second.num_samples == windows.shape[0]
    names = set(layer_projections(model.model.layers[0]))
    assert ("q_bias" in names) == qkv_bias
    for a, b in zip(stored.layers, second.layers, strict=True):
        assert set(a.fisher) == names
        for name in names:
            assert torch.allclose(a.fisher[name], b.fisher[name], rtol=1e-4, atol=1e-9)
        for metric in FUSABLE[:3]:
            assert len(a.loo_atoms[metric]) == windows.shape[0]
            for x, y in zip(a.loo_atoms[metric], b.loo_atoms[metric], strict=True):
                assert x.keys() == y.keys()
                for atom in x:
                    assert torch.allclose(x[atom], y[atom], rtol=1e-4, atol=1e-7)
        for x, y in zip(a.sample_inputs, b.sample_inputs, strict=True):
            for key in ("o_sum", "o_sq", "down_sum", "down_sq", "tokens"):
                assert torch.allclose(x[key], y[key], rtol=1e-6), key
    # the stored mode forms the mean gradient, the per-batch element atoms and the
    # input moments from the kept activations; the second pass's first pass
    # from autograd's weight gradients and its input hooks
    for ga, gb in zip(stored.grads, second.grads, strict=True):
        assert ga.keys() == gb.keys()
        for name in ga:
            # float32 sums in another order: elements that cancel to near zero
            # differ by a millionth of the largest
            scale = float(gb[name].abs().max())
            assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-6 * scale)
    for a, b in zip(stored.layers, second.layers, strict=True):
        assert a.tokens == b.tokens == windows.numel()
        for key in ("o_in_sum", "o_in_sq", "down_in_sum", "down_in_sq"):
            assert torch.allclose(getattr(a, key), getattr(b, key), rtol=1e-9), key
        assert len(a.batch_element_atoms) == len(b.batch_element_atoms) == 3
        for x, y in zip(a.batch_element_atoms, b.batch_element_atoms, strict=True):
            assert x.keys() == y.keys()
            for atom in x:
                assert torch.allclose(x[atom], y[atom], rtol=1e-4, atol=1e-7), atom


def test_stored_mode_refuses_when_the_activations_do_not_fit(
    tiny_model_dir, windows, monkeypatch
):
    model, _ = load_model(tiny_model_dir)
    need = stats_module.stored_bytes(model, windows)
    # 4 layers x (64*3 + 128 inputs + 64*2 + 32*2 + 128*2 + 64 outputs) floats
    # per token, and 8 windows' gradients of the largest projection (128 x 64)
    activations = 4 * (64 * 3 + 128 + 64 * 2 + 32 * 2 + 128 * 2 + 64) * 8 * 32
    assert need == (activations + 8 * 128 * 64) * 4
    monkeypatch.setattr(stats_module, "available_bytes", lambda: need)
    with pytest.raises(PruningError, match="importance.per_window: second_pass"):
        _per_window_stats(model, windows, "stored")
    # the second pass keeps nothing, so it runs
    assert _per_window_stats(model, windows, "second_pass").num_samples == 8
    with pytest.raises(ValueError, match="'twice' is not known"):
        _per_window_stats(model, windows, "twice")


def test_jackknife_list_limits_the_replicates_and_changes_no_score(
    tiny_model_dir, windows
):
    """``importance.jackknife``: replicates of the listed estimators only, equal
    to those computed with every estimator jackknifed; every score unchanged."""
    model, _ = load_model(tiny_model_dir)
    names = ["taylor_vector", "taylor_vector_group", "taylor_element1", "wanda_sp"]
    every = scores_of(model, windows, names)
    chosen = ["taylor_element1", "wanda_sp"]
    stats = collect_for(model, windows, 3, names, progress=False, jackknife=chosen)
    some = scores_from_stats(stats, names, 0, {}, jackknife=chosen)
    # SAAP's default inputs (element1, flap) are always computed
    assert set(every.replicates) == set(with_fusion_inputs(names))
    assert set(some.replicates) == set(chosen)
    # the per-window pass evaluated no other metric's salience
    assert set(stats.layers[0].loo_atoms) == {"taylor_element1"}
    for name in chosen:
        for got, want in zip(
            some.replicates[name], every.replicates[name], strict=True
        ):
            for kind in want:
                assert torch.equal(got[kind], want[kind]), (name, kind)
    for name in names:
        for got, want in zip(some.scores[name], every.scores[name], strict=True):
            for kind in want:
                assert torch.equal(got[kind], want[kind]), (name, kind)
    # SAAP fuses what was replicated, and names the missing metric otherwise
    assert some.estimate("saap", chosen)[0]
    with pytest.raises(DataError, match=r"taylor_vector.*importance\.jackknife"):
        some.estimate("saap", ["taylor_vector", "wanda_sp"])
