"""Calibration windows: seeded token windows from the calibration half of a corpus."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saap.data import calibration_documents, sample_window_sets
from saap.errors import DataError
from saap.params import CalibrationParams


def make_calibration(
    tokenizer, text_dir: Path, params: CalibrationParams
) -> tuple[dict[str, torch.Tensor], dict]:
    """Windows for importance (``input_ids``), held-back ones (``holdout_ids``)
    and, with ``refit_samples``, more windows for the least-squares refit only
    (``refit_ids``), disjoint from both. The first two do not depend on
    ``refit_samples``."""
    docs = calibration_documents(text_dir, params.corpus)
    token_ids = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    total = params.num_samples + params.holdout_samples
    sizes = [total] + ([params.refit_samples] if params.refit_samples else [])
    sets = sample_window_sets(token_ids, sizes, params.seq_len, params.seed)
    windows, chosen = sets[0]
    perm = torch.randperm(
        total, generator=torch.Generator().manual_seed(params.seed + 1)
    )
    windows = windows[perm]
    meta = {
        "corpus": params.corpus,
        "documents_used": sorted({doc for doc, _ in chosen}),
        "documents_in_pool": len(docs),
        "num_samples": params.num_samples,
        "holdout_samples": params.holdout_samples,
        "seq_len": params.seq_len,
        "seed": params.seed,
        "sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
    }
    tensors = {"input_ids": windows[: params.num_samples].contiguous()}
    if params.holdout_samples:
        tensors["holdout_ids"] = windows[params.num_samples :].contiguous()
    if params.refit_samples:
        refit, refit_chosen = sets[1]
        tensors["refit_ids"] = refit.contiguous()
        # only when asked for: a default calibration keeps its bytes
        meta["refit_samples"] = params.refit_samples
        meta["refit_documents_used"] = sorted({doc for doc, _ in refit_chosen})
        meta["refit_sha256"] = hashlib.sha256(refit.numpy().tobytes()).hexdigest()
    return tensors, meta


def fit_windows(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The windows the least-squares refit fits on: the importance windows and,
    where the calibration drew them (``calibration.refit_samples``), the
    refit-only ones after them."""
    if "refit_ids" not in tensors:
        return tensors["input_ids"]
    return torch.cat([tensors["input_ids"], tensors["refit_ids"]])


def save_calibration(
    tensors: dict[str, torch.Tensor], meta: dict, out_dir: Path
) -> None:
    save_file(tensors, str(out_dir / "tokens.safetensors"))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_calibration(in_dir: Path) -> dict[str, torch.Tensor]:
    path = Path(in_dir) / "tokens.safetensors"
    if not path.is_file():
        raise DataError(
            f"{path} is missing; the calibration stage writes it "
            "(dvc repro calibration)"
        )
    return load_file(str(path))
