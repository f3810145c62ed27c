"""Two llama.cpp builds of the same source, side by side: the build this
revision makes (``ensure_llamacpp``) against a reference build folder (e.g. the
one an older revision left in ``~/.cache/saap/llama.cpp/build-<key>``).

- Speed: ``llama-bench`` (batch 1, the bench stage's shapes) of each GGUF file
  with each build, alternating build by build, order reversed every other
  round; the ratio this/reference per kind (prefill, decode) is paired by
  (round, file) with a 95% t-interval.
- Numbers: ``llama-perplexity`` on the PTB test text, ``llama-results``' logits
  of a prompt and a greedy ``llama-completion`` must be identical between the
  builds (the parts compiled differently do no numeric work).
- Build: the ``build_seconds`` each ``build.json`` recorded (measured when each
  was built: another hour, so a figure, not a comparison) and what each
  compiles differently from llama.cpp's Release defaults.

Usage: ``.venv/bin/python benchmarks/llamacpp_build.py --reference
~/.cache/saap/llama.cpp/build-<key> [--files 'models/gguf/finetuned/*.gguf']
[--rounds 6] [--out docs/bench_llamacpp_build.md]``
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from saap.comparison import seed_ratio
from saap.runtime.llamacpp import (
    LlamaCpp,
    bench_once,
    complete,
    ensure_llamacpp,
    logits,
    perplexity,
)

SHAPE_KEYS = ("unoptimised", "unoptimised_sources", "unity", "unity_excluded")
PROMPT = "The capital of France is"


def reference_build(root: Path, source: Path) -> LlamaCpp:
    info_file = root / "build.json"
    if not info_file.is_file():
        raise SystemExit(f"{root} holds no build.json: give a llama.cpp build folder")
    return LlamaCpp(root, source, json.loads(info_file.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--files", default="models/gguf/finetuned/*.gguf")
    parser.add_argument("--text", type=Path, default=Path("data/text/ptb_test.txt"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    files = [Path(p) for p in sorted(glob.glob(args.files))]
    if not files:
        raise SystemExit(f"no GGUF files match {args.files!r}; run `saap run` first")
    this = ensure_llamacpp()
    builds = {"this": this, "reference": reference_build(args.reference, this.source)}
    if builds["this"].root.resolve() == args.reference.resolve():
        raise SystemExit("--reference is this revision's own build")
    threads = min(2, os.cpu_count() or 1)

    speeds = {b: {f: {"prefill": [], "decode": []} for f in files} for b in builds}
    for round_ in range(args.rounds):
        for path in files:
            order = list(builds) if round_ % 2 == 0 else list(reversed(builds))
            for name in order:
                got = bench_once(
                    builds[name], path, args.prompt_len, args.decode_tokens, threads
                )
                for kind, value in got.items():
                    speeds[name][path][kind].append(value)

    same = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            ppl, logit, text = {}, {}, {}
            for name, tools in builds.items():
                work = Path(tmp) / name
                work.mkdir(exist_ok=True)
                ppl[name] = perplexity(tools, path, args.text, 128, 16, threads)["ppl"]
                logit[name] = logits(tools, path, PROMPT, work)[1]
                text[name] = complete(tools, path, PROMPT, 16, threads)
            same[path] = {
                "perplexity": ppl["this"] == ppl["reference"],
                "ppl": ppl["this"],
                "logits": bool(np.array_equal(logit["this"], logit["reference"])),
                "completion": text["this"] == text["reference"],
            }

    lines = [
        "# llama.cpp build: this revision's against a reference build",
        "",
        f"Command: `.venv/bin/python benchmarks/llamacpp_build.py --reference "
        f"{args.reference} --files '{args.files}' --rounds {args.rounds}`; "
        f"llama-bench -p {args.prompt_len} -n {args.decode_tokens} -t {threads}, "
        "builds alternating, order reversed every other round.",
        "",
        "| build | build_seconds (its own build.json) | compiled differently |",
        "|---|---:|---|",
    ]
    for name, tools in builds.items():
        shape = {k: tools.info[k] for k in SHAPE_KEYS if k in tools.info}
        lines.append(
            f"| {name} ({tools.root.name}) | {tools.info.get('build_seconds')} | "
            f"`{json.dumps(shape)}` |"
        )
    lines += [
        "",
        "| file | kind | this, tokens/s (mean) | reference "
        "| this / reference, 95% CI |",
        "|---|---|---:|---:|---|",
    ]
    for kind in ("prefill", "decode"):
        both = {b: [] for b in builds}
        for path in files:
            for b in builds:
                both[b] += speeds[b][path][kind]
            ratio = seed_ratio(
                speeds["this"][path][kind], speeds["reference"][path][kind]
            )
            lines.append(
                f"| {path.name} | {kind} | {np.mean(speeds['this'][path][kind]):.1f} | "
                f"{np.mean(speeds['reference'][path][kind]):.1f} | "
                f"{ratio.value:.3f} [{ratio.lower:.3f}, {ratio.upper:.3f}] |"
            )
        ratio = seed_ratio(both["this"], both["reference"])
        lines.append(
            f"| all | {kind} | | | {ratio.value:.3f} "
            f"[{ratio.lower:.3f}, {ratio.upper:.3f}] |"
        )
    lines += [
        "",
        "| file | llama-perplexity (16 x 128 PTB) | identical: perplexity | logits | "
        "greedy completion |",
        "|---|---:|---|---|---|",
    ]
    for path, row in same.items():
        lines.append(
            f"| {path.name} | {row['ppl']:.4f} | {row['perplexity']} | {row['logits']} "
            f"| {row['completion']} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
