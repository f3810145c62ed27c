"""The header of a GGUF file (metadata and tensor table), read without the data.

``gguf.GGUFReader`` builds a numpy view for every part of every metadata value:
for SmolLM2's tokenizer (49,152 tokens and 48,900 merges, each a string) that is
about a million memmap views, about 4 s per file on these 2-core machines, and the
export and bench stages read each GGUF file one to three times (about a minute
of a cold ``make run``). This reader walks the same layout with ``struct`` and
numpy's ``frombuffer`` for numeric arrays: the values and the tensor table equal
GGUFReader's (tests/saap/test_gguf_info.py checks both on written files).

Layout (GGUF v2/v3, little-endian, as llama.cpp and ``gguf.GGUFWriter`` write
it): magic ``GGUF``, uint32 version, uint64 tensor count, uint64 key/value
count; each key/value: string key, uint32 value type, value (an array is a
uint32 element type, a uint64 count and the elements); each tensor: string
name, uint32 dimension count, uint64 per dimension, uint32 ggml type, uint64
offset. A string is a uint64 byte length and UTF-8 bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saap.errors import DataError

MAGIC = b"GGUF"

# GGUFValueType -> (struct code, numpy dtype) of the fixed-size types
_SCALARS = {
    0: ("B", np.uint8),
    1: ("b", np.int8),
    2: ("H", np.uint16),
    3: ("h", np.int16),
    4: ("I", np.uint32),
    5: ("i", np.int32),
    6: ("f", np.float32),
    7: ("?", np.bool_),
    10: ("Q", np.uint64),
    11: ("q", np.int64),
    12: ("d", np.float64),
}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(DataError):
    """The file is not a GGUF file this reader understands (a stage reports it
    as a data error, without a traceback)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    # as GGUF stores them: the fastest-varying dimension first
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    # from the start of the data section, as stored
    offset: int
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    fields: dict[str, Any]
    tensors: list[TensorInfo]

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


class _Cursor:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, code: str) -> Any:
        size = struct.calcsize("<" + code)
        if self.pos + size > len(self.data):
            raise GGUFFormatError(
                f"{self.path}: header ends early at byte {self.pos}; the file is "
                "truncated (export it again)"
            )
        (value,) = struct.unpack_from("<" + code, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("Q")
        raw = bytes(self.data[self.pos : self.pos + length])
        if len(raw) != length:
            raise GGUFFormatError(
                f"{self.path}: header ends inside a string; the file is truncated "
                "(export it again)"
            )
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item == _ARRAY:
                return [self.value(self.take("I")) for _ in range(count)]
            if item not in _SCALARS:
                raise GGUFFormatError(f"{self.path}: unknown array type {item}")
            dtype = np.dtype(_SCALARS[item][1]).newbyteorder("<")
            end = self.pos + count * dtype.itemsize
            if end > len(self.data):
                raise GGUFFormatError(
                    f"{self.path}: header ends inside an array; the file is "
                    "truncated (export it again)"
                )
            values = np.frombuffer(self.data[self.pos : end], dtype=dtype).tolist()
            self.pos = end
            return values
        if kind not in _SCALARS:
            raise GGUFFormatError(f"{self.path}: unknown value type {kind}")
        return self.take(_SCALARS[kind][0])


def read_gguf(path: str | Path) -> GGUFInfo:
    """Metadata (key -> Python value, as ``ReaderField.contents()`` gives it) and
    the tensor table of a GGUF file; the tensor data is not read."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with path.open("rb") as handle:
        try:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GGUFFormatError(f"{path} is empty; export it again") from None
    with mapped:
        cursor = _Cursor(memoryview(mapped), path)
        try:
            if bytes(cursor.data[:4]) != MAGIC:
                raise GGUFFormatError(
                    f"{path} does not start with {MAGIC!r}: not a GGUF file"
                )
            cursor.pos = 4
            version = cursor.take("I")
            if version not in (2, 3):
                raise GGUFFormatError(
                    f"{path}: GGUF version {version} (byte order or version this "
                    "reader does not know; it reads little-endian v2 and v3)"
                )
            n_tensors, n_fields = cursor.take("Q"), cursor.take("Q")
            fields = {}
            for _ in range(n_fields):
                key = cursor.string()
                fields[key] = cursor.value(cursor.take("I"))
            tensors = []
            for _ in range(n_tensors):
                name = cursor.string()
                shape = tuple(cursor.take("Q") for _ in range(cursor.take("I")))
                ggml_type, offset = cursor.take("I"), cursor.take("Q")
                try:
                    kind = GGMLQuantizationType(ggml_type)
                except ValueError:
                    raise GGUFFormatError(
                        f"{path}: tensor {name!r} has ggml type {ggml_type}, which "
                        "this gguf package does not know"
                    ) from None
                block, type_size = GGML_QUANT_SIZES[kind]
                n_elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
                tensors.append(
                    TensorInfo(
                        name=name,
                        shape=shape,
                        ggml_type=ggml_type,
                        type_name=kind.name,
                        offset=offset,
                        n_elements=n_elements,
                        n_bytes=n_elements // block * type_size,
                    )
                )
        finally:
            cursor.data.release()
    return GGUFInfo(version=version, fields=fields, tensors=tensors)
