"""Calibration windows: seeded token windows from the calibration half of a corpus."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saap.data import calibration_documents, sample_windows
from saap.errors import DataError
from saap.params import CalibrationParams


def make_calibration(
    tokenizer, text_dir: Path, params: CalibrationParams
) -> tuple[dict[str, torch.Tensor], dict]:
    """Windows for importance (``input_ids``) and held-back ones (``holdout_ids``)."""
    docs = calibration_documents(text_dir, params.corpus)
    token_ids = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    total = params.num_samples + params.holdout_samples
    windows, chosen = sample_windows(token_ids, total, params.seq_len, params.seed)
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
    return tensors, meta


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
