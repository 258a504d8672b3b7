"""Compact tensor encodings for the .capz artifact: fp16, per-row int8, sparse (bitmask) and constant forms.

Pruning masks alone do not shrink a file, and torch's COO/CSR formats are larger than dense,
so a pruned tensor is stored as a bitmask of its nonzeros (1 bit per element, ``np.packbits``)
plus only the nonzero values. Those values are in turn stored as fp32, fp16 or int8, which
gives the six encodings below; each decodes to a float32 tensor of the original shape. A tensor
whose elements are all one value (a folded batch norm's weight, mean and variance; see ``fold``)
is stored as that one value, in its own dtype (``const``).

int8 is symmetric per row: row = dim 0 (a Linear's output unit, a conv's output channel),
the rest flattened; a 1-D tensor is one row. ``scale = max|row| / 127`` (at least float32
eps, so an all-zero row decodes to zeros, never NaN) and ``q = round(x / scale)`` in
[-127, 127]. ONNX Runtime's symmetric per-channel int8 picks the same grid, so re-quantizing a
decoded weight for int8 compute there gives back the same integers and the stored and computed
weights agree (``deploy.ort_quantize``).

``ENCODINGS`` is the registry the artifact reader and writer look encodings up in. Each entry also
gives its ``layout``: the chunks (dtype, shape) a tensor of a given shape must have, so the reader
checks a stranger's file against it before it decodes anything.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

EPS = float(torch.finfo(torch.float32).eps)  # smallest scale, as torch's observers use


# ---------------------------------------------------------------- the registry, and raw storage
# encode(tensor) -> (params, {chunk: ndarray});  decode(params, chunks, shape, dtype) -> tensor
# layout(shape, dtype, nnz) -> {chunk: (numpy dtype str, chunk shape)}, or None when ``dtype`` cannot be
# stored this way; ``nnz`` is the number of set mask bits (sparse encodings only, else None)

# entry dtype -> numpy dtype of its raw bytes: the dtypes a state dict holds, and nothing else
RAW_DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4",
              "int16": "<i2", "int8": "|i1", "uint8": "|u1", "bool": "|b1"}


class Encoding(NamedTuple):
    encode: Callable
    decode: Callable
    layout: Callable


def _enc_raw(t: torch.Tensor):
    return {}, {"data": t.contiguous().numpy()}


def _dec_raw(params, chunks, shape, dtype):
    return torch.from_numpy(chunks["data"].reshape(shape).copy())


def _layout_raw(shape, dtype, nnz):
    return {"data": (RAW_DTYPES[dtype], tuple(shape))} if dtype in RAW_DTYPES else None


def is_constant(t: torch.Tensor) -> bool:
    """Whether ``t`` has more than one element, all equal (stored as one value, ``const``)."""
    flat = t.detach().reshape(-1)
    return flat.numel() > 1 and bool((flat == flat[0]).all())


def _enc_const(t: torch.Tensor):
    return {}, {"value": t.detach().reshape(-1)[:1].contiguous().numpy()}


def _dec_const(params, chunks, shape, dtype):
    return torch.from_numpy(np.full(shape, chunks["value"][0], dtype=chunks["value"].dtype))


def _layout_const(shape, dtype, nnz):
    return {"value": (RAW_DTYPES[dtype], (1,))} if dtype in RAW_DTYPES else None


ENCODINGS: dict[str, Encoding] = {"raw": Encoding(_enc_raw, _dec_raw, _layout_raw),
                                  "const": Encoding(_enc_const, _dec_const, _layout_const)}


def register_encoding(name: str, encode: Callable, decode: Callable, layout: Callable) -> None:
    ENCODINGS[name] = Encoding(encode, decode, layout)


# ---------------------------------------------------------------- int8 per row


def row_shape(shape) -> tuple[int, int]:
    """(rows, cols): dim 0 against the rest flattened; 0-D and 1-D tensors are one row."""
    shape = tuple(shape)
    if len(shape) < 2:
        return 1, int(np.prod(shape, dtype=np.int64))
    return shape[0], int(np.prod(shape[1:], dtype=np.int64))


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [rows, cols], float32 scales [rows]) of the symmetric per-row int8 grid."""
    x = t.detach().float().reshape(row_shape(t.shape))
    scale = (x.abs().amax(1) / 127).clamp(min=EPS) if x.shape[1] else x.new_ones(x.shape[0])
    q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    return (q.reshape(row_shape(shape)).float() * scale[:, None]).reshape(shape)


# ---------------------------------------------------------------- dense encodings


def _enc_fp16(t):
    return {}, {"data": t.detach().to(torch.float16).contiguous().numpy()}


def _dec_fp16(params, chunks, shape, dtype):
    return torch.from_numpy(chunks["data"].astype(np.float32)).reshape(shape)


def _layout_fp16(shape, dtype, nnz):
    return {"data": ("<f2", tuple(shape))} if dtype == "float32" else None


def _enc_int8_row(t):
    q, scale = quantize_rows(t)
    return {}, {"values": q.numpy(), "scales": scale.numpy()}


def _dec_int8_row(params, chunks, shape, dtype):
    q = torch.from_numpy(chunks["values"].copy())
    return dequantize_rows(q, torch.from_numpy(chunks["scales"].copy()), shape)


def _layout_int8_row(shape, dtype, nnz):
    rows, cols = row_shape(shape)
    return {"values": ("|i1", (rows, cols)), "scales": ("<f4", (rows,))} if dtype == "float32" else None


# ---------------------------------------------------------------- sparse encodings
# chunks: "mask" (packed bits of flat != 0) + "values" (the nonzeros, flat order) [+ "scales"]


def _mask(t: torch.Tensor) -> np.ndarray:
    return (t.detach().reshape(-1) != 0).numpy()


def mask_bytes(shape) -> int:
    """Length of the packed mask of a tensor of ``shape``: one bit per element, rounded up to bytes."""
    return (int(np.prod(shape, dtype=np.int64)) + 7) // 8


def _unmask(chunks, shape) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    return np.unpackbits(chunks["mask"], count=n).astype(bool)


def _scatter(keep: np.ndarray, values: np.ndarray, shape) -> torch.Tensor:
    dense = np.zeros(keep.shape, dtype=np.float32)
    dense[keep] = values
    return torch.from_numpy(dense).reshape(shape)


def _sparse(store_dtype):
    value_dtype = np.dtype(store_dtype).str

    def encode(t):
        keep = _mask(t)
        values = t.detach().float().reshape(-1).numpy()[keep].astype(store_dtype)
        return {}, {"mask": np.packbits(keep), "values": values}

    def decode(params, chunks, shape, dtype):
        return _scatter(_unmask(chunks, shape), chunks["values"].astype(np.float32), shape)

    def layout(shape, dtype, nnz):
        return ({"mask": ("|u1", (mask_bytes(shape),)), "values": (value_dtype, (nnz,))}
                if dtype == "float32" else None)

    return encode, decode, layout


def _enc_sparse_int8(t):
    keep = _mask(t)
    q, scale = quantize_rows(t)
    return {}, {"mask": np.packbits(keep), "values": q.reshape(-1).numpy()[keep], "scales": scale.numpy()}


def _dec_sparse_int8(params, chunks, shape, dtype):
    keep = _unmask(chunks, shape)
    q = np.zeros(keep.shape, dtype=np.int8)
    q[keep] = chunks["values"]
    scales = torch.from_numpy(chunks["scales"].copy())
    return dequantize_rows(torch.from_numpy(q), scales, shape)


def _layout_sparse_int8(shape, dtype, nnz):
    if dtype != "float32":
        return None
    return {"mask": ("|u1", (mask_bytes(shape),)), "values": ("|i1", (nnz,)), "scales": ("<f4", (row_shape(shape)[0],))}


register_encoding("fp16", _enc_fp16, _dec_fp16, _layout_fp16)
register_encoding("int8_row", _enc_int8_row, _dec_int8_row, _layout_int8_row)
register_encoding("sparse_raw", *_sparse(np.float32))
register_encoding("sparse_fp16", *_sparse(np.float16))
register_encoding("sparse_int8", _enc_sparse_int8, _dec_sparse_int8, _layout_sparse_int8)

# bits per stored value, and whether the encoding keeps one float32 scale per row
VALUE_BITS = {"fp16": 16, "int8_row": 8, "sparse_raw": 32, "sparse_fp16": 16, "sparse_int8": 8}
SPARSE = frozenset({"sparse_raw", "sparse_fp16", "sparse_int8"})
ROW_SCALED = frozenset({"int8_row", "sparse_int8"})
