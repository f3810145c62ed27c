"""The GGUF header reader against gguf's own GGUFReader, on files written by
gguf's GGUFWriter: every metadata value and the tensor table agree."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from saap.runtime.gguf_info import GGUFFormatError, read_gguf

pytestmark = pytest.mark.unit


def write(path, tensors=True):
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_uint8("t.u8", 7)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 65000)
    writer.add_int16("t.i16", -3000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -5)
    writer.add_float32("t.f32", 0.25)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "ünïcode ✓")
    writer.add_array("llama.feed_forward_length", [1536, 1024, 64])
    writer.add_array("t.floats", [0.5, -1.5])
    writer.add_array("t.strings", ["a", "", "Ġthe", "x" * 300])
    writer.add_key_value(
        "t.bools", [True, False], GGUFValueType.ARRAY, sub_type=GGUFValueType.BOOL
    )
    if tensors:
        rng = np.random.default_rng(0)
        writer.add_tensor("a.f32", rng.standard_normal((3, 5)).astype(np.float32))
        writer.add_tensor("b.f16", rng.standard_normal((4, 64)).astype(np.float16))
        q = quantize(
            rng.standard_normal((2, 64)).astype(np.float32), GGMLQuantizationType.Q8_0
        )
        writer.add_tensor("c.q8_0", q, raw_dtype=GGMLQuantizationType.Q8_0)
        q4 = quantize(
            rng.standard_normal((3, 64)).astype(np.float32), GGMLQuantizationType.Q4_0
        )
        writer.add_tensor("d.q4_0", q4, raw_dtype=GGMLQuantizationType.Q4_0)
        writer.add_tensor("e.vector", np.arange(7, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_fields_and_tensors_equal_gguf_reader(tmp_path):
    path = write(tmp_path / "m.gguf")
    info = read_gguf(path)
    reader = GGUFReader(str(path))
    expected = {
        k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")
    }
    assert info.fields == expected
    assert info.fields["t.strings"] == ["a", "", "Ġthe", "x" * 300]
    assert info.fields["t.str"] == "ünïcode ✓"
    assert info.fields["llama.feed_forward_length"] == [1536, 1024, 64]
    assert info.fields["t.u64"] == 2**40 and info.fields["t.f64"] == 1e-300
    assert info.version == reader.fields["GGUF.version"].contents()
    assert [
        (t.name, t.shape, t.type_name, t.n_elements, t.n_bytes) for t in info.tensors
    ] == [
        (
            t.name,
            tuple(int(d) for d in t.shape),
            t.tensor_type.name,
            int(t.n_elements),
            int(t.n_bytes),
        )
        for t in reader.tensors
    ]
    # offsets from the data section's start, as stored
    start = min(int(t.data_offset) for t in reader.tensors)
    assert [t.offset for t in info.tensors] == [
        int(t.data_offset) - start for t in reader.tensors
    ]
    # 15 f32 + 256 f16 + 2 q8_0 rows (2 blocks of 34 bytes) + 3 q4_0 rows
    # (2 blocks of 18 bytes) + 7 f32
    assert info.tensor_bytes == 15 * 4 + 256 * 2 + 2 * 2 * 34 + 3 * 2 * 18 + 7 * 4


def test_a_file_without_tensors(tmp_path):
    info = read_gguf(write(tmp_path / "m.gguf", tensors=False))
    assert info.tensors == [] and info.tensor_bytes == 0
    assert info.fields["llama.block_count"] == 3


def test_bad_files_name_the_file_and_the_fix(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFFormatError, match="empty.gguf is empty; export it again"):
        read_gguf(empty)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(GGUFFormatError, match="other.gguf does not start with"):
        read_gguf(other)
    whole = write(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:200])
    with pytest.raises(GGUFFormatError, match="cut.gguf.*(truncated|ends)"):
        read_gguf(cut)
    wrong = tmp_path / "v9.gguf"
    wrong.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(GGUFFormatError, match="version 9"):
        read_gguf(wrong)
