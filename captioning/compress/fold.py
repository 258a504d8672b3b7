"""Batch norm folded into the convolution before it, for storage.

In eval mode a batch norm after a convolution is a per-channel affine map, ``y = x * s + shift``
with ``s = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * s``. Folding ``s``
into the convolution's output channels leaves a batch norm whose weight is all ones, mean all zeros
and variance all ``1 - eps``: three constant tensors, which the artifact stores as one value each
(the ``const`` encoding). Only ``shift`` still takes a float per channel, so a CNN encoder's four
floats per channel become one. Every deployment runtime folds batch norm the same way.

The model's structure is untouched: the folded state loads into the same module, so an artifact
stays readable by the plain loader. int8 rows are per output channel and ``quantize_rows`` scales
each row by its own maximum, so folding first rescales the row scales and keeps the integers, but
for values that sit on a rounding tie after the float product (0.1% of lite0's).

Pairs are found by data flow, not by names: a forward pass records which convolution's output
tensor each batch norm receives. The folded model is then run on the same input and compared with
the original; if they disagree (a convolution whose output also feeds something else) nothing is
folded.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm
_TOLERANCE = 1e-4  # relative to the largest output


def _folded_var(bn: _BN) -> torch.Tensor:
    return torch.full_like(bn.running_var, 1.0).sub_(bn.eps)


def is_folded(bn: _BN) -> bool:
    """Whether ``bn`` already holds the folded constants (folding it again would only add rounding)."""
    return bool((bn.weight == 1).all() and (bn.running_mean == 0).all()
                and torch.equal(bn.running_var, _folded_var(bn)))


def conv_bn_pairs(module: nn.Module, sample: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, batch norm name) for each batch norm whose input is a bias-free convolution's output."""
    outputs, pairs, hooks = {}, [], []
    names = {m: n for n, m in module.named_modules()}

    def conv_hook(m, args, out):
        outputs[id(out)] = (names[m], out)  # the tensor is kept, so its id is not reused during the pass

    def bn_hook(m, args):
        conv = outputs.get(id(args[0]))
        if conv is not None and conv[1] is args[0]:
            pairs.append((conv[0], names[m]))

    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.bias is None:
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, _BN) and m.affine and m.track_running_stats:
            hooks.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            module(sample)
    finally:
        for h in hooks:
            h.remove()
    return pairs


def _fold(state: dict[str, torch.Tensor], module: nn.Module, pairs) -> dict[str, torch.Tensor]:
    state = dict(state)
    mods = dict(module.named_modules())
    for conv, bn_name in pairs:
        bn = mods[bn_name]
        p = f"{bn_name}." if bn_name else ""
        w, b = state[f"{p}weight"].float(), state[f"{p}bias"].float()
        mean, var = state[f"{p}running_mean"].float(), state[f"{p}running_var"].float()
        scale = w / torch.sqrt(var + bn.eps)
        cw = state[f"{conv}.weight"]
        state[f"{conv}.weight"] = cw * scale.reshape(-1, *([1] * (cw.ndim - 1))).to(cw.dtype)
        state[f"{p}bias"] = (b - mean * scale).to(state[f"{p}bias"].dtype)
        state[f"{p}weight"] = torch.ones_like(state[f"{p}weight"])
        state[f"{p}running_mean"] = torch.zeros_like(state[f"{p}running_mean"])
        state[f"{p}running_var"] = _folded_var(bn).to(state[f"{p}running_var"].dtype)
    return state


def folded_state(module: nn.Module, sample: torch.Tensor,
                 state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``state`` (default: the module's own) with every conv -> batch norm pair folded.

    ``module`` gives the structure and ``sample`` the input the pairs are traced and the fold is
    checked on. A batch norm that is already folded is left alone.
    """
    state = {k: v.detach().cpu() for k, v in (state or module.state_dict()).items()}
    ref = copy.deepcopy(module).cpu().eval()
    ref.load_state_dict(state)
    sample = sample.cpu()
    mods = dict(ref.named_modules())
    pairs = [(c, b) for c, b in conv_bn_pairs(ref, sample) if not is_folded(mods[b])]
    if not pairs:
        return state
    out = _fold(state, ref, pairs)
    with torch.no_grad():
        want = ref(sample)
        ref.load_state_dict(out)  # ref is this function's own copy: it may now hold the folded weights
        got = ref(sample)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for a, b in zip(want, got):
        if not torch.allclose(a, b, rtol=0, atol=_TOLERANCE * max(float(a.abs().max()), 1.0)):
            warnings.warn("batch norm not folded: the folded model's outputs differ from the original's")
            return state
    return out


__all__ = ["conv_bn_pairs", "folded_state", "is_folded"]
