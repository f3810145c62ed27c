"""The compress flow's profile override: params.yaml edited for the run only,
comments kept, restored byte for byte; a bad profile names the choices."""

from __future__ import annotations

import pytest
import yaml

from flows.compress import evaluation_profile
from saap.errors import ParamsError

pytestmark = pytest.mark.unit

PARAMS = """\
# the project's params, with a comment that must survive
evaluate:
  profile: quick   # make run
  profiles:
    quick: {limit: 50}
    nightly: {limit: null}
gates:
  variant: finetuned
"""


def test_profile_is_set_for_the_run_and_restored(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    with evaluation_profile(path, "nightly"):
        inside = path.read_text()
        assert yaml.safe_load(inside)["evaluate"]["profile"] == "nightly"
        assert "# the project's params" in inside
    assert path.read_text() == PARAMS
    with pytest.raises(RuntimeError), evaluation_profile(path, "nightly"):
        raise RuntimeError("stage failed")
    assert path.read_text() == PARAMS  # restored after a failure too
    with evaluation_profile(path, None), evaluation_profile(path, "quick"):
        assert path.read_text() == PARAMS  # nothing to change


def test_unknown_profile_names_the_defined_ones(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    with (
        pytest.raises(ParamsError, match=r"'weekly' is not defined.*nightly"),
        evaluation_profile(path, "weekly"),
    ):
        pass
    assert path.read_text() == PARAMS


def test_gated_variant_must_be_benchmarked(tmp_path):
    from flows.compress import benched_variants

    path = tmp_path / "params.yaml"
    path.write_text("gates:\n  variant: finetuned\n")
    assert benched_variants(path) == ["finetuned"]  # the default list
    path.write_text(
        "gates:\n  variant: pruned\nbench:\n  variants: [pruned, finetuned]\n"
    )
    assert benched_variants(path) == ["pruned", "finetuned"]
    path.write_text("gates:\n  variant: pruned\nbench:\n  variants: [finetuned]\n")
    with pytest.raises(ParamsError, match=r"add 'pruned' to bench.variants"):
        benched_variants(path)
    path.write_text("bench:\n  variants: [finetuned, finetuned]\n")
    with pytest.raises(ParamsError, match="repeats a variant"):
        benched_variants(path)
    path.write_text("bench:\n  variants: [dense]\n")
    with pytest.raises(ParamsError, match=r"bench.variants.0"):
        benched_variants(path)


def test_gated_variant_must_be_evaluated(tmp_path):
    from flows.compress import evaluated_variants

    path = tmp_path / "params.yaml"
    path.write_text("gates:\n  variant: finetuned\n")
    assert evaluated_variants(path) == ["finetuned"]  # the default list
    path.write_text("evaluate:\n  variants: [pruned, finetuned]\n")
    assert evaluated_variants(path) == ["pruned", "finetuned"]
    path.write_text("gates:\n  variant: pruned\nevaluate:\n  variants: [finetuned]\n")
    with pytest.raises(
        ParamsError, match=r"eval/pruned.json; add 'pruned' to evaluate.variants"
    ):
        evaluated_variants(path)
    path.write_text("evaluate:\n  variants: [finetuned, finetuned]\n")
    with pytest.raises(ParamsError, match="repeats a variant"):
        evaluated_variants(path)
    # dense is always evaluated (evaluate-dense), never listed
    path.write_text("evaluate:\n  variants: [dense, finetuned]\n")
    with pytest.raises(ParamsError, match=r"evaluate.variants.0"):
        evaluated_variants(path)
