"""Reading a GGUF file's header: gguf's ``GGUFReader`` against
``saap.runtime.gguf_info.read_gguf``, on the exported GGUF files of a run
(export and bench stages read each file for its tensor types, tensor bytes and
a few metadata values). The readers alternate file by file, order reversed
every other round; the ratio is paired by (round, file) with a 95% t-interval.
Also checks that both give the same metadata values and tensor table.

Usage: ``.venv/bin/python benchmarks/gguf_header.py [--files 'models/gguf/*/*.gguf']
[--rounds 2] [--out docs/bench_gguf_header.md]``
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from pathlib import Path

from gguf import GGUFReader

from saap.comparison import seed_ratio
from saap.runtime.gguf_info import read_gguf


def with_gguf_reader(path: Path):
    reader = GGUFReader(str(path))
    fields = {
        k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")
    }
    tensors = [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_bytes))
        for t in reader.tensors
    ]
    return fields, tensors


def with_header_reader(path: Path):
    info = read_gguf(path)
    tensors = [(t.name, t.shape, t.type_name, t.n_bytes) for t in info.tensors]
    return info.fields, tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", default="models/gguf/*/*.gguf")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    files = [Path(p) for p in sorted(glob.glob(args.files))]
    if not files:
        raise SystemExit(f"no GGUF files match {args.files!r}; run `saap run` first")
    readers = {"GGUFReader": with_gguf_reader, "read_gguf": with_header_reader}
    seconds = {name: [] for name in readers}
    same = True
    for round_ in range(args.rounds):
        for path in files:
            order = list(readers) if round_ % 2 == 0 else list(reversed(readers))
            results = {}
            for name in order:
                started = time.perf_counter()
                results[name] = readers[name](path)
                seconds[name].append(time.perf_counter() - started)
            same &= results["GGUFReader"] == results["read_gguf"]
    ratio = seed_ratio(seconds["read_gguf"], seconds["GGUFReader"])
    lines = [
        "# Reading GGUF headers: GGUFReader against read_gguf",
        "",
        f"`.venv/bin/python benchmarks/gguf_header.py --files '{args.files}' "
        f"--rounds {args.rounds}` ({os.cpu_count()} CPUs; {len(files)} files, "
        "readers alternating file by file, order reversed every other round).",
        "",
        "| reader | seconds per file: median (min-max) |",
        "|---|---|",
    ]
    for name, values in seconds.items():
        ordered = sorted(values)
        lines.append(
            f"| {name} | {ordered[len(ordered) // 2]:.3f} "
            f"({ordered[0]:.3f}-{ordered[-1]:.3f}) |"
        )
    lines += [
        "",
        f"read_gguf / GGUFReader time, paired by (round, file): **{ratio.value:.3f} "
        f"[{ratio.lower:.3f}, {ratio.upper:.3f}]** (95% t-interval, n = {ratio.n}). "
        "Metadata values and tensor tables (name, shape, type, bytes) "
        + ("identical for every file." if same else "**differ**."),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
