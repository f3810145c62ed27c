"""Atomic outputs: a failure leaves the previous output as it was."""

from __future__ import annotations

import json

import pytest

from saap.atomic import atomic_dir, atomic_file, write_json

pytestmark = pytest.mark.unit


def test_failed_directory_write_keeps_previous_output(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # normal permissions


def test_failed_file_write_keeps_previous_file(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"a": 1})
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as tmp:
        tmp.write_text("{broken")
        raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_jsonl_keeps_one_record_a_line_whatever_the_text(tmp_path):
    from saap.atomic import write_jsonl

    texts = ["a\u2028b", "c\u2029d\x85e", "f\ng\rh\x0bi\x0cj\x1ck", "plain"]
    write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == texts
