"""A safetensors writer that streams tensors to disk one at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; an engine rank of a large
model does not fit. The layout is fixed before any data is written (names, dtypes and shapes are
known from the model config), so the header goes first and each tensor follows as it is produced.
The file is standard safetensors: ``safetensors.safe_open`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
}


class StreamingSafetensorsWriter:
    """Write ``layout`` (ordered name -> (shape, dtype)) tensor by tensor; the sha256 is computed on the way."""

    def __init__(self, path: str, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None):
        self.path = path
        self.layout = layout
        self._order = list(layout)
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        for name, (shape, dtype) in layout.items():
            nbytes = dtype.itemsize
            for s in shape:
                nbytes *= s
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._sha = hashlib.sha256()
        self._f = open(path, "wb")
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self.total_bytes = offset

    def _emit(self, data) -> None:
        self._sha.update(data)
        self._f.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next]
        if name != expected:
            raise ValueError(f"tensor '{name}' written out of order (expected '{expected}')")
        shape, dtype = self.layout[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor '{name}' has shape {tuple(tensor.shape)}, layout says {tuple(shape)}")
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        self._emit(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
        self._next += 1

    def close(self) -> str:
        """Finishes the file and returns its sha256 hex digest."""
        if self._next != len(self._order):
            self._f.close()
            raise ValueError(f"{len(self._order) - self._next} tensors were never written to {self.path}")
        self._f.close()
        return self._sha.hexdigest()


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
