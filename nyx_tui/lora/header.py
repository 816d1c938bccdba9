"""Reading and writing safetensors files by hand, safely, without torch and without loading a file whole.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (`{name: {dtype, shape,
data_offsets: [start, end]}, "__metadata__": {str: str}}`, padded with spaces to a multiple of 8), then the
data section, which the offsets index. The length comes from the file, so a crafted or truncated file could
ask for a huge allocation: `read_header` bounds it (≤ 100 MB and within the file) before reading a byte of
JSON, then checks every entry (known dtype, shape × item size = its byte range, ranges inside the data section
without overlap), and says what is wrong and how to fix it in a `LoraFileError`.

Tensors are read one at a time by offset (`read_tensor`, numpy; bf16 and fp8 decoded to float32, which
numpy lacks), and `write_safetensors` writes a file from raw bytes per tensor, so converting or re-heading a
bf16 file keeps every untouched tensor's bytes as they were. Every write goes to a temp file in the same
folder, then `os.replace`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
ITEM_SIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_NUMPY: dict[str, str] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class LoraFileError(Exception):
    """A file Nyx cannot read or write as asked. `problem` says what is wrong, `fix` what to do about it."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}\nfix: {fix}")
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: dtype (safetensors' name, `F16`), shape, byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    """A file's parsed header: where the data section starts, its tensors (file order) and metadata."""

    path: Path
    file_size: int
    header_len: int
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start


_NOT_SAFETENSORS = "check that it is a .safetensors LoRA (not a .ckpt/.pt, an HTML error page or a partial download)"


def _fail(path: Path, problem: str, fix: str = _NOT_SAFETENSORS) -> LoraFileError:
    return LoraFileError(f"{path}: {problem}", fix)


def _entry(path: Path, name: str, raw: object, data_size: int) -> TensorEntry:
    if not isinstance(raw, dict):
        raise _fail(path, f"the header entry of tensor {name!r} is not an object")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if dtype not in ITEM_SIZE:
        raise _fail(path, f"tensor {name!r} has an unknown dtype {dtype!r}", "re-save the file with a standard dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r} has a bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(path, f"tensor {name!r} has bad data_offsets {offsets!r}")
    start, end = int(offsets[0]), int(offsets[1])
    if end > data_size:
        raise _fail(
            path,
            f"tensor {name!r} ends at byte {end} of a data section of {data_size} bytes: the file is truncated",
            "download or copy the file again (compare its size with the source)",
        )
    if end - start != math.prod(shape) * ITEM_SIZE[str(dtype)]:
        raise _fail(path, f"tensor {name!r}: {end - start} bytes for shape {shape} of {dtype}")
    return TensorEntry(name, str(dtype), tuple(shape), start, end)


def read_header(path: Path | str) -> SafetensorsHeader:
    """The header of a safetensors file, checked (module docstring); `LoraFileError` for anything wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise _fail(path, "is a folder, not a file", "pass the .safetensors file inside it")
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"is {size} bytes long: too short for a safetensors file")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"claims a header of {n:,} bytes (the limit is {MAX_HEADER_BYTES:,})")
            if 8 + n > size:
                raise _fail(
                    path,
                    f"claims a header of {n:,} bytes but the file has only {size - 8:,} after the length",
                    "download or copy the file again; " + _NOT_SAFETENSORS,
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise LoraFileError(f"{path}: no such file", "check the path (ls the folder)") from None
    except PermissionError:
        raise LoraFileError(f"{path}: permission denied", "check the file's permissions") from None
    except IsADirectoryError:
        raise _fail(path, "is a folder, not a file", "pass the .safetensors file inside it") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"its header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _fail(path, f"its header is JSON but not an object ({type(doc).__name__})")
    header = SafetensorsHeader(path=path, file_size=size, header_len=n)
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _fail(path, "its __metadata__ is not a map of strings to strings")
    header.metadata = dict(meta)
    for name, raw_entry in doc.items():
        header.tensors[name] = _entry(path, name, raw_entry, header.data_size)
    spans = sorted((t.start, t.end, t.name) for t in header.tensors.values() if t.nbytes)
    for (_, end_a, a), (start_b, _, b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise _fail(path, f"tensors {a!r} and {b!r} overlap in the data section")
    return header


# ------------------------------------------------------------------------------------------ reading tensors


def _f8_table(exp_bits: int, man_bits: int, bias: int, e4m3: bool) -> np.ndarray:
    """float32 values of all 256 fp8 codes (OCP e4m3fn: no infinities, 0x7f/0xff NaN; e5m2: IEEE-like)."""
    out = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        e = (code >> man_bits) & ((1 << exp_bits) - 1)
        m = code & ((1 << man_bits) - 1)
        if e4m3 and e == 0xF and m == 0x7:
            out[code] = np.nan
        elif not e4m3 and e == 0x1F:
            out[code] = sign * np.inf if m == 0 else np.nan
        elif e == 0:
            out[code] = sign * (m / (1 << man_bits)) * 2.0 ** (1 - bias)
        else:
            out[code] = sign * (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
    return out


_F8 = {"F8_E4M3": _f8_table(4, 3, 7, True), "F8_E5M2": _f8_table(5, 2, 15, False)}


def decode(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's bytes as a numpy array of `shape` (bf16/fp8 as float32)."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype in _F8:
        return _F8[dtype][np.frombuffer(raw, dtype=np.uint8)].reshape(shape)
    return np.frombuffer(raw, dtype=_NUMPY[dtype]).reshape(shape)


def encode(array: np.ndarray, dtype: str) -> bytes:
    """The bytes of `array` stored as `dtype` (float32 → bf16 rounds to nearest even; fp8 is not written)."""
    if dtype == "BF16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
        return (rounded >> 16).astype("<u2").tobytes()
    if dtype not in _NUMPY:
        raise LoraFileError(f"writing {dtype} tensors is not supported", "convert the file to fp16/bf16/fp32 first")
    return np.ascontiguousarray(array, dtype=_NUMPY[dtype]).tobytes()


def read_raw(header: SafetensorsHeader, name: str, f: BinaryIO | None = None) -> bytes:
    """A tensor's bytes as stored (seek + read: the rest of the file stays on disk)."""
    entry = header.tensors[name]
    if f is None:
        with open(header.path, "rb") as fh:
            return read_raw(header, name, fh)
    f.seek(header.data_start + entry.start)
    raw = f.read(entry.nbytes)
    if len(raw) != entry.nbytes:
        raise _fail(header.path, f"tensor {name!r} is cut short: the file changed or is truncated")
    return raw


def read_tensor(header: SafetensorsHeader, name: str, f: BinaryIO | None = None) -> np.ndarray:
    """One tensor as numpy, read by offset (bf16/fp8 come back as float32)."""
    if name not in header.tensors:
        raise KeyError(name)
    entry = header.tensors[name]
    return decode(read_raw(header, name, f), entry.dtype, entry.shape)


def numpy_dtype_name(array: np.ndarray) -> str:
    """safetensors' name of a numpy dtype."""
    for name, np_name in _NUMPY.items():
        if np.dtype(np_name) == array.dtype:
            return name
    raise LoraFileError(f"numpy dtype {array.dtype} has no safetensors name", "cast it to float16/float32")


# ------------------------------------------------------------------------------------------ writing


def header_bytes(entries: Iterable[tuple[str, str, tuple[int, ...], int, int]], metadata: Mapping[str, str]) -> bytes:
    """The length prefix + JSON header for (name, dtype, shape, start, end) entries, padded with spaces to a
    multiple of 8 as safetensors pads it (so the data section stays aligned)."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    for name, dtype, shape, start, end in entries:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def check_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """Metadata as safetensors requires it (string keys and values), else a LoraFileError naming the key."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise LoraFileError(
                f"metadata {key!r} = {value!r} is a {type(value).__name__}: safetensors metadata holds only strings",
                "pass the value as text (json.dumps a list or a number)",
            )
    return dict(metadata)  # type: ignore[arg-type]


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_safetensors(
    path: Path | str, tensors: Iterable[tuple[str, str, tuple[int, ...], bytes]], metadata: Mapping[str, str]
) -> Path:
    """Write (name, dtype, shape, bytes) tensors + metadata atomically (temp file, fsync, os.replace)."""
    path = Path(path)
    meta = check_metadata(metadata)
    items = list(tensors)
    entries, offset = [], 0
    for name, dtype, shape, raw in items:
        if len(raw) != math.prod(shape) * ITEM_SIZE[dtype]:
            raise ValueError(f"{name}: {len(raw)} bytes for shape {shape} of {dtype}")
        entries.append((name, dtype, tuple(shape), offset, offset + len(raw)))
        offset += len(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(header_bytes(entries, meta))
            for _, _, _, raw in items:
                f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
