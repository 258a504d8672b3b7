"""Quantization modes: how each tensor is stored in the artifact, and how the loaded model computes.

A mode is a storage policy:

    mode   weights (dim >= 2)        1-D tensors        compute on torch
    fp32   raw                       raw                fp32
    fp16   fp16                      fp16               fp32 (fp16 is slow on CPU; storage only)
    int8   int8 per row              raw fp32 (tiny)    fp32 on the int8 grid (weight-only int8)
           (depthwise kernels fp16)

A depthwise kernel has 9 weights per channel and few channels: it is a small share of the encoder
(lite0: 182K of 3.3M conv weights), and int8 there is what int8 costs in CIDEr. Measured on the
768-wide Up-Down at 90% sparsity (3,000 test images): depthwise kernels fp16 +1.6% CIDEr
[+0.4, +2.9] over int8, and +0.4% [-0.5, +1.4] against the same model in fp32; 6.38 MB against
6.22. With the whole encoder fp32 and the decoder int8 it scores the same as fp32 (+0.1%), so the
decoder's int8 costs nothing.

Every float tensor is stored sparsely (bitmask + nonzeros) instead when that takes fewer bytes,
so pruned weights shrink the file in every mode, and a tensor of one repeated value (a folded batch
norm's constants) is stored as that value. ``roundtrip`` applies exactly the artifact's
encode/decode to an in-memory model, so a quantized model in memory and the same model loaded
from its artifact hold identical weights and write identical captions.

On torch every mode computes in float: the loaded weights are the stored int8 values times their
row's scale. int8 compute is ONNX Runtime's (``captioning.deploy.ort_quantize``, the artifact's
``onnxruntime`` runtime): torch's dynamic int8 (``torch.ao.quantization``) is deprecated, was no
faster end to end (0.98-1.14x fp32 in ``benchmarks/latency.py``: the encoder's convolutions never
had int8 kernels) and captioned as weight-only int8 does (CIDEr 1.6764 against 1.6762 on the
768-wide Up-Down at 90% sparsity, 3,000 test images).
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from . import artifact
from .encodings import ROW_SCALED, SPARSE, VALUE_BITS, is_constant, row_shape

# mode -> (dense encoding, sparse encoding) of its float weights
_POLICY = {
    "fp32": ("raw", "sparse_raw"),
    "fp16": ("fp16", "sparse_fp16"),
    "int8": ("int8_row", "sparse_int8"),
}
QUANT_MODES = tuple(_POLICY)
_FP16_MAX = float(torch.finfo(torch.float16).max)


def check_mode(mode: str) -> str:
    if mode not in _POLICY:
        raise UserError(f"unknown quantization '{mode}'; known: {', '.join(QUANT_MODES)}")
    return mode


# ---------------------------------------------------------------- storage policy


def _value_bits(encoding: str, t: torch.Tensor) -> int:
    return VALUE_BITS.get(encoding, t.element_size() * 8)


def _payload_bytes(encoding: str, t: torch.Tensor, nnz: int) -> int:
    """Bytes of the chunks an encoding writes (before zstd)."""
    n = t.numel()
    values = (nnz if encoding in SPARSE else n) * _value_bits(encoding, t) // 8
    mask = math.ceil(n / 8) if encoding in SPARSE else 0
    scales = 4 * row_shape(t.shape)[0] if encoding in ROW_SCALED else 0
    return values + mask + scales


def _depthwise(t: torch.Tensor) -> bool:
    """A conv kernel [out, 1, kh, kw] with more than one tap: one input channel per filter."""
    return t.ndim == 4 and t.shape[1] == 1 and t.shape[2] * t.shape[3] > 1


def encoding_for(mode: str, group: str, name: str, tensor: torch.Tensor) -> str:
    """The artifact encoding of one tensor under ``mode`` (see the table above).

    ``group``/``name`` are part of the interface so a policy may single tensors out; this one
    decides from the tensor alone. Sparse is chosen only when its bytes are fewer than dense.
    """
    dense, sparse = _POLICY[check_mode(mode)]
    t = tensor.detach()
    if is_constant(t):
        return "const"
    if not t.is_floating_point() or t.numel() == 0:
        return "raw"  # counters such as BN num_batches_tracked
    if mode == "int8" and _depthwise(t):
        mode, (dense, sparse) = "fp16", _POLICY["fp16"]
    if (mode == "int8" and t.ndim < 2) or (mode == "fp16" and bool(t.abs().max() > _FP16_MAX)):
        dense, sparse = _POLICY["fp32"]  # 1-D: scales would cost as much as they save; fp16: overflow
    nnz = int(torch.count_nonzero(t))
    return sparse if _payload_bytes(sparse, t, nnz) < _payload_bytes(dense, t, nnz) else dense


def roundtrip(groups: dict[str, dict[str, torch.Tensor]], mode: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor as the artifact would give it back: decode(encode(t)) with its chosen encoding."""
    out = {}
    for group, state in groups.items():
        out[group] = {}
        for name, t in state.items():
            t = t.detach().cpu()
            enc = encoding_for(mode, group, name, t)
            encoding = artifact.ENCODINGS[enc]
            params, chunks = encoding.encode(t)
            out[group][name] = encoding.decode(params, chunks, tuple(t.shape), str(t.dtype).removeprefix("torch."))
    return out


def storage_floor_bytes(groups: dict[str, dict[str, torch.Tensor]], mode: str) -> int:
    """The ideal size of the stored values, to compare artifact sizes against: per tensor,
    nonzeros x bits of its encoding, + 1 bit per element for the mask when stored sparse,
    + 32 bits per int8 scale.

    It floors the format, not the file: zstd finds some redundancy in real weights (skewed
    exponents, low-entropy masks), so an artifact is typically 0.85-0.92x of this when dense
    and can go lower when very sparse.
    """
    bits = 0
    for group, state in groups.items():
        for name, t in state.items():
            enc = encoding_for(mode, group, name, t)
            if enc == "const":
                bits += t.element_size() * 8
                continue
            bits += int(torch.count_nonzero(t)) * _value_bits(enc, t)
            bits += t.numel() if enc in SPARSE else 0
            bits += 32 * row_shape(t.shape)[0] if enc in ROW_SCALED else 0
    return math.ceil(bits / 8)


__all__ = ["QUANT_MODES", "check_mode", "encoding_for", "roundtrip", "storage_floor_bytes"]
