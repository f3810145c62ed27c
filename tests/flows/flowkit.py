"""Helpers of the flow tests: a copy of the project with tiny settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def set_params(project: Path, **sections) -> None:
    """Update sections of the project's params.yaml."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(
    root: Path, tiny_model_dir: Path, text_dir: Path, eval_dir: Path, extra=()
) -> None:
    """The pipeline's code, dvc.yaml and params.yaml under ``root``, reading the
    tiny model and fixture data (no downloads)."""
    for name in ("saap", "stages", "flows", *extra):
        shutil.copytree(
            ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    data = root.parent / f"{root.name}-data"
    shutil.copytree(eval_dir, data / "eval")
    shutil.copytree(text_dir, data / "text")
    alpaca = data / "alpaca.json"
    alpaca.write_text(
        json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}] * 8)
    )
    set_params(
        root,
        assets={
            "model_source": f"dir:{tiny_model_dir}",
            "data_source": f"dir:{data}",
            "instruct_source": f"file:{alpaca}",
        },
    )


def tiny_settings(root: Path) -> None:
    """Settings that run the whole pipeline on the tiny fixture in minutes, with
    gates every candidate passes."""
    set_params(
        root,
        calibration={"num_samples": 8, "holdout_samples": 2, "seq_len": 32},
        importance={
            "batch_size": 2,
            # and the metrics the default prune section fuses (element1, flap)
            "estimators": ["taylor_vector", "taylor_element1", "flap"],
        },
        prune={"ratio": 0.2, "skip_first": 1, "skip_last": 1},
        evaluate={
            "profiles": {
                "quick": {"limit": 4, "ppl_max_windows": 4, "fidelity_windows": 4}
            },
            "batch_size": 4,
            "ppl_seq_len": 32,
            "resamples": 200,
            "prompts": ["the model"],
            "max_new_tokens": 4,
        },
        finetune={
            "max_steps": 2,
            "batch_size": 2,
            "micro_batch_size": 2,
            "val_size": 2,
            "eval_steps": 1,
            "save_steps": 1,
            "cutoff_len": 64,
            # no nightly evaluation profile above, so no nightly recovery budget
            "profiles": {},
        },
        # nor nightly teacher text
        teacher_text={"profiles": {}},
        bench={
            "prompt_len": 8,
            "decode_tokens": 4,
            "repeats": 4,
            "warmup": 1,
            "threads": 1,
        },
        # the fixture's byte-level BPE splits text as GPT-2 does
        export={"pre_tokenizer": "gpt-2", "gguf_types": ["f16", "q8_0"], "threads": 1},
        gates={
            "min_accuracy_retention": 0.0,
            "max_ppl_ratio": 100.0,
            "max_kl": 100.0,
            "min_decode_speedup": 0.0,
            "champion_tolerance": 1.0,
            "champion_ppl_tolerance": 100.0,
        },
    )


def init_repo(root: Path) -> None:
    """A git repository with DVC initialised (the flow runs DVC stages)."""
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
