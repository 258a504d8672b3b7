"""The deployable artifact (`.capz`): encoder + decoder + vocabulary + config in one file, no pickle.

Layout (little-endian)::

    b"CAPZ" | u16 format version | u64 body length | sha256(body) (32 bytes) | body
    body = zstd( u32 header length | header JSON | tensor chunks )

The header lists every tensor with its group (encoder/decoder), shape, dtype and
encoding, and where each of its byte chunks lies. An encoding turns a tensor into
named chunks and back (see ``encodings.ENCODINGS``), so pruned and quantized storage are
new entries there, not new file formats. The checksum makes a tampered or
truncated file fail with one clear line instead of loading garbage; the checks in ``read`` do the
same for a file crafted to pass the checksum (bounded inflation, every entry checked against its
encoding's layout before it is decoded).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from ..io import write_bytes
from .encodings import ENCODINGS, SPARSE, mask_bytes

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
    data = seal(struct.pack("<I", len(header)) + header + b"".join(blobs))
    write_bytes(path, data)
    return len(data)


def seal(raw: bytes) -> bytes:
    """The file bytes of an (uncompressed) body: prefix, checksum, zstd frame that declares its size."""
    import zstandard

    body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest()) + body


# ---------------------------------------------------------------- reading
# An artifact may come from a stranger: nothing is allocated from a size the file declares until
# that size is checked against a bound and against the bytes that are really there.

MAX_BODY_BYTES = 2 << 30      # compressed body, and the body once decompressed
MAX_ELEMENTS = 1 << 29        # elements of all tensors together (2 GiB as float32; COCO AoANet is 0.2 G)
_READ_CHUNK = 1 << 20


def read(path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read and verify an artifact: returns (config, {group: state dict}).

    Any file that is not a well-formed artifact fails with one ``UserError`` naming the file and
    what is wrong, and memory stays bounded by ``MAX_BODY_BYTES`` and ``MAX_ELEMENTS`` first.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: artifact not found")
    with path.open("rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[:4] != MAGIC:
            raise UserError(f"{path}: not a captioning artifact (.capz)")
        _, version, body_len, digest = _PREFIX.unpack(prefix)
        if version != FORMAT_VERSION:
            raise UserError(f"{path}: artifact format version {version}; this captioning reads version "
                            f"{FORMAT_VERSION} (re-pack it with this version)")
        if body_len > MAX_BODY_BYTES:
            raise UserError(f"{path}: artifact body of {body_len} bytes is over the {MAX_BODY_BYTES}-byte limit")
        have = os.fstat(f.fileno()).st_size - _PREFIX.size  # known before a byte of the body is read
        if have != body_len:
            what = "truncated" if have < body_len else "longer than its header says"
            raise UserError(f"{path}: artifact is {what} ({have} of {body_len} body bytes)")
        body = f.read(body_len)
    if hashlib.sha256(body).digest() != digest:
        raise UserError(f"{path}: artifact is corrupted (checksum mismatch)")
    raw = _inflate(body, path)
    header, payload = _header(raw, path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for e, chunks in _entries(header["tensors"], payload, path):
        t = ENCODINGS[e["encoding"]].decode(e["params"], chunks, tuple(e["shape"]), e["dtype"])
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # no trained weight is NaN or inf
            raise UserError(f"{path}: tensor {e['group']}/{e['name']} holds NaN or infinite values")
        groups.setdefault(e["group"], {})[e["name"]] = t
    return header["config"], groups


def _inflate(body: bytes, path) -> memoryview:
    """The decompressed body, never longer than the size its zstd frame declares (itself bounded).

    Output grows only as real data comes out, so a frame that lies about its size fails before
    it can exhaust memory.
    """
    import zstandard

    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError:
        raise UserError(f"{path}: artifact body is not a zstd frame") from None
    if declared < 0:
        raise UserError(f"{path}: artifact body does not declare its decompressed size (refused: unbounded)")
    if declared > MAX_BODY_BYTES:
        raise UserError(f"{path}: artifact body inflates to {declared} bytes, over the {MAX_BODY_BYTES}-byte limit")
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            while chunk := reader.read(_READ_CHUNK):
                out += chunk
                if len(out) > declared:
                    raise UserError(f"{path}: artifact body inflates past the {declared} bytes it declares")
    except zstandard.ZstdError as e:
        raise UserError(f"{path}: artifact body does not decompress ({e})") from None
    if len(out) != declared:
        raise UserError(f"{path}: artifact body inflates to {len(out)} bytes, not the {declared} it declares")
    return memoryview(out)


def _header(raw: memoryview, path) -> tuple[dict, memoryview]:
    """(header dict, tensor payload) of a decompressed body, the header's top level checked."""
    if len(raw) < 4:
        raise UserError(f"{path}: artifact body is too short for a header")
    (hlen,) = struct.unpack_from("<I", raw)
    if hlen > len(raw) - 4:
        raise UserError(f"{path}: artifact header length {hlen} runs past the body ({len(raw) - 4} bytes)")
    try:
        header = json.loads(bytes(raw[4:4 + hlen]))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: artifact header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("config"), dict) \
            or not isinstance(header.get("tensors"), list):
        raise UserError(f"{path}: artifact header needs a 'config' object and a 'tensors' list")
    if header.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: artifact header says format version {header.get('format_version')!r}, "
                        f"not {FORMAT_VERSION}")
    return header, raw[4 + hlen:]


def _count(x) -> bool:
    """A JSON integer >= 0 (not a bool, which Python counts as an int)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entries(index: list, payload: memoryview, path):
    """Yield (entry, {chunk: ndarray}) for each tensor of the header, every field checked against the
    payload and the encoding's layout before the tensor is decoded."""
    seen, elements = set(), 0
    for i, e in enumerate(index):
        if not isinstance(e, dict):
            raise UserError(f"{path}: tensor entry {i} is not an object")
        group, name = e.get("group"), e.get("name")
        if not isinstance(group, str) or not isinstance(name, str):
            raise UserError(f"{path}: tensor entry {i} needs a string 'group' and 'name'")
        where = f"{path}: tensor {group}/{name}"
        if (group, name) in seen:
            raise UserError(f"{where} is listed twice")
        seen.add((group, name))
        shape, dtype, enc = e.get("shape"), e.get("dtype"), e.get("encoding")
        if not isinstance(shape, list) or not all(_count(n) for n in shape) or len(shape) > 8:
            raise UserError(f"{where}: shape must be a list of at most 8 integers >= 0, got {shape!r}")
        elements += int(np.prod(shape, dtype=object))
        if elements > MAX_ELEMENTS:
            raise UserError(f"{where}: the tensors hold over {MAX_ELEMENTS} elements (the loading limit)")
        if not isinstance(enc, str) or enc not in ENCODINGS:
            raise UserError(f"{where}: unknown encoding {enc!r}")
        if not isinstance(e.get("params"), dict) or not isinstance(e.get("chunks"), dict):
            raise UserError(f"{where}: needs 'params' and 'chunks' objects")
        nnz = None
        if enc in SPARSE:
            mask = _chunk(e["chunks"], "mask", ("|u1", (mask_bytes(shape),)), payload, where)
            nnz = _popcount(mask, int(np.prod(shape, dtype=np.int64)), where)
        layout = ENCODINGS[enc].layout(shape, dtype, nnz) if isinstance(dtype, str) else None
        if layout is None:
            raise UserError(f"{where}: dtype {dtype!r} cannot be stored as {enc}")
        if set(e["chunks"]) != set(layout):
            raise UserError(f"{where}: {enc} needs chunks {sorted(layout)}, found {sorted(e['chunks'])}")
        yield e, {c: _chunk(e["chunks"], c, layout[c], payload, where) for c in layout}


def _chunk(chunks: dict, cname: str, expected: tuple[str, tuple], payload: memoryview, where: str) -> np.ndarray:
    """One chunk as a read-only array over the payload, after its record matches ``expected``."""
    dtype, shape = expected
    shape = shape or (1,)  # pack stores a 0-d tensor's chunk as [1] (np.ascontiguousarray is at least 1-d)
    c = chunks.get(cname)
    if not isinstance(c, dict):
        raise UserError(f"{where}: chunk '{cname}' is missing")
    if c.get("dtype") != dtype or c.get("shape") != list(shape):
        raise UserError(f"{where}: chunk '{cname}' should be {dtype} {list(shape)}, "
                        f"is {c.get('dtype')!r} {c.get('shape')!r}")
    offset, nbytes = c.get("offset"), c.get("nbytes")
    if not _count(offset) or not _count(nbytes) or offset + nbytes > len(payload):
        raise UserError(f"{where}: chunk '{cname}' (offset {offset!r}, {nbytes!r} bytes) lies outside "
                        f"the {len(payload)}-byte payload")
    if nbytes != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
        raise UserError(f"{where}: chunk '{cname}' has {nbytes} bytes; {dtype} {list(shape)} needs "
                        f"{int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize}")
    return np.frombuffer(payload[offset:offset + nbytes], dtype=np.dtype(dtype)).reshape(shape)


def _popcount(mask: np.ndarray, n: int, where: str) -> int:
    """Set bits of a packed mask of ``n`` elements; its padding bits must be clear."""
    if n % 8 and mask[-1] & ((1 << (8 - n % 8)) - 1):
        raise UserError(f"{where}: mask has bits set past its {n} elements")
    return int(np.bitwise_count(mask).sum(dtype=np.int64))
