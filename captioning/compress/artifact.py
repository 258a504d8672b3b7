"""The deployable artifact (`.capz`): encoder + decoder + vocabulary + config in one file, no pickle.

Layout (little-endian)::

    b"CAPZ" | u16 format version | u64 body length | sha256(body) (32 bytes) | body
    body = zstd( u32 header length | header JSON | tensor chunks )

The header lists every tensor with its group (encoder/decoder), shape, dtype and
encoding, and where each of its byte chunks lies. An encoding turns a tensor into
named chunks and back (see ``encodings.ENCODINGS``), so pruned and quantized storage are
new entries there, not new file formats. The checksum makes a tampered or
truncated file fail with one clear line instead of loading garbage.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from ..io import write_bytes
from .encodings import ENCODINGS

MAGIC = b"CAPZ"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHQ32s")
ZSTD_LEVEL = 6

# ---------------------------------------------------------------- writing


def pack(path, groups: dict[str, dict[str, torch.Tensor]], config: dict,
         encode_as: Callable[[str, str, torch.Tensor], str] | None = None) -> int:
    """Write an artifact. ``groups`` maps group name -> state dict; ``config`` is any JSON-able dict
    (model configs, vocabulary, quantization runtime). ``encode_as(group, name, tensor)`` picks
    each tensor's encoding (default raw). Returns the file size in bytes."""
    index, blobs, offset = [], [], 0
    for group, state in groups.items():
        for name, t in state.items():
            t = t.detach().cpu()
            enc = encode_as(group, name, t) if encode_as else "raw"
            params, chunks = ENCODINGS[enc][0](t)
            entry = {"group": group, "name": name, "shape": list(t.shape),
                     "dtype": str(t.dtype).removeprefix("torch."), "encoding": enc,
                     "params": params, "chunks": {}}
            for cname, arr in chunks.items():
                arr = np.ascontiguousarray(arr)
                b = arr.tobytes()
                entry["chunks"][cname] = {"offset": offset, "nbytes": len(b),
                                          "dtype": arr.dtype.str, "shape": list(arr.shape)}
                blobs.append(b)
                offset += len(b)
            index.append(entry)
    header = json.dumps({"format_version": FORMAT_VERSION, "config": config,
                         "tensors": index}).encode()
    import zstandard

    body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(
        struct.pack("<I", len(header)) + header + b"".join(blobs))
    data = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest()) + body
    write_bytes(path, data)
    return len(data)


# ---------------------------------------------------------------- reading


def read(path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read and verify an artifact: returns (config, {group: state dict})."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: artifact not found")
    data = path.read_bytes()
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise UserError(f"{path}: not a captioning artifact (.capz)")
    _, version, body_len, digest = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: artifact format version {version}; this captioning reads version "
                        f"{FORMAT_VERSION} (re-pack it with this version)")
    body = data[_PREFIX.size:]
    if len(body) != body_len:
        raise UserError(f"{path}: artifact is truncated ({len(body)} of {body_len} body bytes)")
    if hashlib.sha256(body).digest() != digest:
        raise UserError(f"{path}: artifact is corrupted (checksum mismatch)")
    import zstandard

    raw = zstandard.ZstdDecompressor().decompress(body)
    (hlen,) = struct.unpack_from("<I", raw)
    header = json.loads(raw[4:4 + hlen])
    payload = memoryview(raw)[4 + hlen:]
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for e in header["tensors"]:
        chunks = {}
        for cname, c in e["chunks"].items():
            buf = payload[c["offset"]:c["offset"] + c["nbytes"]]
            chunks[cname] = np.frombuffer(buf, dtype=np.dtype(c["dtype"])).reshape(c["shape"])
        if e["encoding"] not in ENCODINGS:
            raise UserError(f"{path}: unknown tensor encoding '{e['encoding']}'")
        t = ENCODINGS[e["encoding"]][1](e["params"], chunks, tuple(e["shape"]), e["dtype"])
        groups.setdefault(e["group"], {})[e["name"]] = t
    return header["config"], groups

