"""Reading the header of a GGUF file (llama.cpp's checkpoint format) and dequantizing its tensors.

The header is parsed here with a few lines of `struct`: `gguf.GGUFReader` builds one numpy view per
vocabulary entry, which takes ~25 s for Gemma-3's 262144 tokens. The `gguf` package
(`pip install 'fora[gguf]'`) still does the dequantization (`gguf.quants.dequantize`).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# GGUF value types (gguf.md): numpy dtypes of the scalar types; 8 = string, 9 = array
_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
           10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _F32 = 8, 9, 6


def _f32(x: float) -> float:
    # Metadata floats are float32: 1e-5 is stored as 9.99999974e-06. Keep the shortest decimal that
    # round-trips in float32 so config.json reads like the original (same float32 value).
    return float(str(np.float32(x)))


def _require_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'fora[gguf]'") from e
    return gguf


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]   # PyTorch order (GGUF lists dimensions innermost first)
    offset: int              # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """The parsed header of a GGUF file: metadata and where each tensor's bytes are."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    data: np.ndarray = field(repr=False, compare=False)  # the whole file, memory-mapped (uint8)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor(self, name: str, chunk_rows: int = 16384) -> torch.Tensor:
        """Tensor `name` dequantized to float32 (via `gguf.quants.dequantize`), in PyTorch layout."""
        gguf = _require_gguf()
        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        raw = self.data[info.offset:info.offset + info.nbytes]
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        raw = raw.reshape(rows, info.nbytes // rows)
        out = np.empty((rows, info.shape[-1]), dtype=np.float32)
        try:
            for start in range(0, rows, chunk_rows):  # row chunks keep the temporaries small
                out[start:start + chunk_rows] = gguf.quants.dequantize(raw[start:start + chunk_rows], qtype)
        except NotImplementedError as e:
            raise ValueError(f"{self.path}: tensor {name} has type {qtype.name}, which gguf "
                             f"{getattr(gguf, '__version__', '')} cannot dequantize; upgrade gguf "
                             "(pip install -U gguf) or use a file with another quantization") from e
        return torch.from_numpy(out.reshape(info.shape))


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise EOFError
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALAR:
                dtype = np.dtype(_SCALAR[itype])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(itype) for _ in range(count)]
        if vtype not in _SCALAR:
            raise ValueError(f"unknown GGUF value type {vtype}")
        value = np.frombuffer(self.take(np.dtype(_SCALAR[vtype]).itemsize), dtype=_SCALAR[vtype])[0].item()
        return _f32(value) if vtype == _F32 else value


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header of a GGUF (v2/v3, little-endian) file; no tensor data is read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found; check the path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                         "pass a llama.cpp .gguf checkpoint")
    if size < 24:
        raise ValueError(f"{path} is truncated ({size} bytes); {_fix(path)}")
    # a plain ndarray view: slicing an np.memmap creates memmap objects, slow in the dequant loops
    data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    cur = _Cursor(memoryview(data))
    try:
        cur.take(4)
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (only v2/v3, little-endian); "
                             "re-convert the model with a current llama.cpp")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    except EOFError:
        raise ValueError(f"{path} is truncated (its header ends after {size} bytes); {_fix(path)}") from None
    align = int(metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // align) * align
    gguf = _require_gguf()
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ValueError(f"{path}: tensor {name} has unknown ggml type {ggml_type}; "
                             "upgrade gguf (pip install -U gguf)") from None
        rows = int(np.prod(dims[1:], dtype=np.int64))
        nbytes = rows * dims[0] // block * type_size
        tensors[name] = GGUFTensorInfo(name, ggml_type, tuple(reversed(dims)), data_start + offset, nbytes)
    end = max((t.offset + t.nbytes for t in tensors.values()), default=cur.pos)
    if end > size:
        raise ValueError(f"{path} is truncated ({size} bytes, its tensors need {end}); {_fix(path)}")
    return GGUFFile(path, metadata, tensors, data)


def _fix(path: Path) -> str:
    from fora.formats.cache import damaged_fix

    return damaged_fix(path, "re-download it / re-install its package")
