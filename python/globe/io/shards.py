"""The safetensors files of a checkpoint folder: which shard holds which key, headers read without loading.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range in the data section, then the data. Reading only the header gives every shape and
the parameter count of a checkpoint of any size at the cost of a few kilobytes per shard, and lets us tell a
truncated or corrupt file (and name it) before a tensor is touched.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from globe.errors import CheckpointError

__all__ = ["TensorInfo", "ShardSet", "read_header", "FLOAT_DTYPES"]

#: safetensors dtype names and their element sizes in bytes.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

#: safetensors dtype names of the floating-point types we read experts from, and their torch dtypes.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}

# A header larger than this is not a real one: the file is corrupt (or not safetensors at all).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its shard's header describes it."""

    key: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse the header of one safetensors file and check that every tensor's bytes lie inside the file.

    Raises :class:`CheckpointError` naming the file when it is truncated, its header is not valid, or a
    tensor's byte range does not fit its dtype and shape.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes; the header length alone takes 8)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file: its header claims {n} bytes but the "
                    f"file holds {size} bytes in all"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{key}': {entry!r}") from exc
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{path}: tensor '{key}' has unknown safetensors dtype {dtype!r}")
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor '{key}' ends at byte {end} of the data section "
                f"but the file holds only {data_bytes} data bytes"
            )
        expected = math.prod(shape) * _ITEMSIZE[dtype]
        if dtype != "F4" and end - begin != expected:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor '{key}' ({dtype}, shape {list(shape)}) needs "
                f"{expected} bytes but its byte range holds {end - begin}"
            )
        out[key] = TensorInfo(key, dtype, shape, path)
    return out


class ShardSet:
    """All safetensors files of a checkpoint folder and the union of their headers.

    Uses ``model.safetensors.index.json`` when present (every shard it names must exist and hold the keys it
    maps there), else ``model.safetensors``, else every ``*.safetensors`` file in the folder.
    """

    INDEX = "model.safetensors.index.json"
    SINGLE = "model.safetensors"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = self._find_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for key, info in read_header(file).items():
                if key in self.tensors:
                    raise CheckpointError(
                        f"{file}: tensor '{key}' is also stored in {self.tensors[key].file.name}"
                    )
                self.tensors[key] = info
        if self._weight_map is not None:
            for key, shard in self._weight_map.items():
                info = self.tensors.get(key)
                if info is None or info.file.name != Path(shard).name:
                    raise CheckpointError(
                        f"{self.folder / self.INDEX}: maps '{key}' to {shard}, which does not hold it"
                    )

    def _find_files(self) -> list[Path]:
        self._weight_map: dict[str, str] | None = None
        index = self.folder / self.INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not a JSON object")
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
            self._weight_map = weight_map
            names = sorted(set(weight_map.values()))
            missing = [name for name in names if not (self.folder / name).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index} names shard(s) missing from {self.folder}: {', '.join(missing)}"
                )
            return [self.folder / name for name in names]
        single = self.folder / self.SINGLE
        if single.is_file():
            return [single]
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return files
        others = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(others)}: convert the checkpoint to safetensors first)" if others else ""
        raise CheckpointError(f"{self.folder}: no safetensors weights ({self.SINGLE} or shards){hint}")

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __getitem__(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def num_parameters(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    def num_bytes(self) -> int:
        return sum(file.stat().st_size for file in self.files)
