"""params.yaml validation: unknown keys and bad values name their path and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from saap.errors import ParamsError
from saap.params import SECTIONS, PruneParams, load_section, parse_section

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_file_is_valid():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in raw:
        assert name in SECTIONS, f"section {name} has no pydantic model"
        parse_section(name, raw[name])


def test_misspelt_key_names_its_path(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("prune:\n  ratoi: 0.2\n")
    with pytest.raises(
        ParamsError, match=r"prune\.ratoi: unknown key; known keys are ratio"
    ):
        load_section(path, "prune")


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(ParamsError, match=rf"prune\.ratio.*{ratio}.*outside \[0, 1\)"):
        parse_section("prune", {"ratio": ratio})


def test_unknown_estimator_and_importance():
    with pytest.raises(ParamsError, match=r"importance\.estimators\.0"):
        parse_section("importance", {"estimators": ["taylor"]})
    with pytest.raises(
        ParamsError,
        match=r"prune\.importance: .*unknown estimator 'fancy'; known: .*saap",
    ):
        parse_section("prune", {"importance": "fancy"})
    with pytest.raises(
        ParamsError, match=r"finetune\.method: .*unknown recovery 'qlora'"
    ):
        parse_section("finetune", {"method": "qlora"})
    with pytest.raises(
        ParamsError, match=r"export\.formats\.0: .*unknown format 'onnx'"
    ):
        parse_section("export", {"formats": ["onnx"]})
    with pytest.raises(
        ParamsError,
        match=r"compare\.methods\.0: .*unknown comparison method 'sparsegpt'",
    ):
        parse_section("compare", {"methods": ["sparsegpt"]})


def test_unknown_section_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="unknown params section 'prunning'"):
        parse_section("prunning", {})
    with pytest.raises(ParamsError, match="does not exist"):
        load_section(tmp_path / "nope.yaml", "prune")


def test_defaults_fill_a_missing_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("assets: {}\n")
    assert load_section(path, "prune") == PruneParams()


def test_evaluation_profiles_resolve_and_unknown_ones_name_the_choices():
    params = parse_section(
        "evaluate",
        {
            "profile": "nightly",
            "profiles": {
                "quick": {"limit": 50},
                "nightly": {"limit": None, "task_limits": {"hellaswag": 2000}},
            },
        },
    )
    nightly = params.resolved()
    assert nightly.profile == "nightly" and nightly.limit is None
    assert nightly.limit_of("hellaswag") == 2000 and nightly.limit_of("piqa") is None
    assert params.resolved("quick").limit == 50
    with pytest.raises(ParamsError, match=r"profile 'weekly' is not defined.*nightly"):
        parse_section("evaluate", {"profile": "weekly"})
    with pytest.raises(ParamsError, match=r"evaluate\.profiles\.quick\.limti"):
        parse_section("evaluate", {"profiles": {"quick": {"limti": 5}}})


def test_per_corpus_windows_override_the_profile_cap_and_name_bad_values():
    params = parse_section(
        "evaluate",
        {
            "profiles": {
                "quick": {"ppl_max_windows": 100, "ppl_windows": {"ptb": None}},
            },
        },
    )
    quick = params.resolved("quick")
    assert quick.windows_of("ptb") is None  # the whole corpus
    assert quick.windows_of("wiki") == 100 and quick.windows_of("c4") == 100
    # the per-corpus caps decide the numbers: they are in the eval-config payload
    assert quick.config_payload()["ppl_windows"] == {"ptb": None}
    with pytest.raises(ParamsError, match=r"ppl_windows\.ptb"):
        parse_section("evaluate", {"profiles": {"quick": {"ppl_windows": {"ptb": 0}}}})
    with pytest.raises(ParamsError, match=r"ppl_windows"):
        parse_section("evaluate", {"profiles": {"quick": {"ppl_windows": {"pbt": 10}}}})
    # the project's quick profile judges the gate's corpus on all of PTB test
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    quick = parse_section("evaluate", raw["evaluate"]).resolved("quick")
    assert quick.windows_of("ptb") is None
    assert parse_section("gates", raw["gates"]).ppl_corpus == "ptb"


def test_finetune_profiles_override_keys_and_name_bad_ones():
    params = parse_section(
        "finetune",
        {"max_steps": 40, "profiles": {"nightly": {"max_steps": 977, "eval_steps": 1}}},
    )
    nightly = params.resolved("nightly")
    assert (nightly.max_steps, nightly.eval_steps, nightly.profiles) == (977, 1, {})
    assert params.resolved("quick") == params.resolved(None)
    assert params.resolved("quick").max_steps == 40
    with pytest.raises(
        ParamsError,
        match=r"finetune\.profiles\.nightly\.max_stepz: unknown key; known keys "
        r"are method",
    ):
        parse_section("finetune", {"profiles": {"nightly": {"max_stepz": 9}}})
    with pytest.raises(
        ParamsError,
        match=r"finetune\.profiles\.nightly\.max_steps: .*greater than 0 \(got 0\)",
    ):
        parse_section("finetune", {"profiles": {"nightly": {"max_steps": 0}}})
    with pytest.raises(
        ParamsError, match=r"finetune\.profiles\.nightly\.micro_batch_size: .*divide"
    ):
        parse_section("finetune", {"profiles": {"nightly": {"micro_batch_size": 3}}})


def test_project_nightly_profile_distils_about_a_million_tokens():
    """The nightly run's recovery budget (measured at 1M tokens: README,
    'Recovery at 1M tokens'), and make run's quick one unchanged by it."""
    from saap.params import load_finetune

    quick, profile = load_finetune(ROOT / "params.yaml")
    assert profile == "quick"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert quick.max_steps == raw["finetune"]["max_steps"]
    nightly = parse_section("finetune", raw["finetune"]).resolved("nightly")
    tokens = nightly.max_steps * nightly.batch_size * nightly.cutoff_len
    assert 1_000_000 <= tokens < 1_001_000 and nightly.method == "kd"


def test_project_nightly_profile_distils_on_teacher_text_it_samples():
    """The nightly recovery reads the teacher's samples (README, 'The nightly
    budget with teacher text') and the same profile samples them; the quick
    profile (make run) does neither. A profile that reads the corpus without
    sampling it is refused before any work, naming the key to set."""
    from saap.params import load_for_profile
    from stages.finetune import check_teacher_text

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    finetune = parse_section("finetune", raw["finetune"])
    text = parse_section("teacher_text", raw["teacher_text"])
    for profile in ("quick", "nightly"):
        check_teacher_text(finetune.resolved(profile), text.resolved(profile), profile)
    assert "teacher" in finetune.resolved("nightly").kd_corpora
    assert text.resolved("nightly").tokens == 655_360
    quick_text, profile = load_for_profile(ROOT / "params.yaml", "teacher_text")
    assert profile == "quick" and quick_text.tokens == 0
    assert "teacher" not in finetune.resolved("quick").kd_corpora
    with pytest.raises(
        ParamsError, match=r"teacher_text\.profiles\.nightly\.tokens.*kd_corpora"
    ):
        check_teacher_text(finetune.resolved("nightly"), text.resolved(None), "nightly")
    # LoRA reads no distillation text: nothing to refuse
    lora = finetune.resolved("nightly").model_copy(update={"method": "lora"})
    check_teacher_text(lora, text.resolved(None), "nightly")


def test_auto_dtype_follows_the_hardware():
    import torch

    from saap.model import native_bfloat16, torch_dtype

    expected = torch.bfloat16 if native_bfloat16() else torch.float32
    assert torch_dtype("auto") == expected
    assert torch_dtype("float32") == torch.float32


@pytest.mark.parametrize(
    "overrides, steps",
    [
        (dict(ratio=0.2), 1),
        (dict(ratio=0.3), 1),
        (dict(ratio=0.5), 2),
        (dict(ratio=0.61), 3),
        (dict(ratio=0.2, iterations=3), 3),
        (dict(ratio=0.5, max_step_ratio=None), 1),
        (dict(ratio=0.5, allocation="layers"), 1),
        (dict(ratio=0.5, ppl_bound=200.0), 1),
    ],
)
def test_steps_follow_max_step_ratio(overrides, steps):
    assert PruneParams(**overrides).steps == steps


def test_jackknife_must_name_computed_fusable_estimators(tmp_path, capsys):
    with pytest.raises(ParamsError, match=r"importance\.jackknife.*'magnitude'"):
        parse_section("importance", {"jackknife": ["magnitude"]})
    # the importance stage refuses, before any work, a list it would not
    # compute or that SAAP could not fuse
    from stages.importance import main

    path = tmp_path / "params.yaml"
    for text, message in (
        (
            # SAAP's default inputs (element1, flap) are always computed
            "importance:\n  estimators: [taylor_element1]\n"
            "  jackknife: [taylor_vector]\n",
            r"jackknife names \['taylor_vector'\].*add them to importance\.estimators",
        ),
        (
            "importance:\n  jackknife: [taylor_element1]\n"
            "prune:\n  saap_metrics: [taylor_element1, wanda_sp]\n",
            r"saap_metrics fuses \['wanda_sp'\].*add them to importance\.jackknife",
        ),
    ):
        path.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            main(["--params", str(path), "--model", str(tmp_path / "absent")])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)


def test_the_comparison_caps_both_corpora_whatever_the_profile_reads():
    """compare.ppl_windows caps PTB and Wikipedia alike, also where the active
    profile reads PTB whole (its per-corpus caps do not leak into the arms)."""
    from stages.compare import compare_evaluate_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    evaluate = parse_section("evaluate", raw["evaluate"])
    compare = parse_section("compare", raw["compare"]).model_copy(
        update={"ppl_windows": 48}
    )
    assert evaluate.resolved().windows_of("ptb") is None  # the profile: whole
    settings = compare_evaluate_params(compare, evaluate)
    assert settings.windows_of("ptb") == 48 and settings.windows_of("wiki") == 48
