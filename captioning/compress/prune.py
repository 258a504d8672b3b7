"""Unstructured magnitude pruning of a caption decoder, held fixed while it is fine-tuned.

What is pruned: every decoder weight with two or more dimensions (``prunable``), i.e. word
embeddings, LSTM/attention matrices and the output layer; biases are left dense, as they are
few. Masks are plain ``{parameter name: bool tensor}`` dicts (True = keep) applied with
``masked_fill_``: torch.nn.utils.prune's reparametrisation buys nothing here and Torch-Pruning
cannot handle ``nn.LSTMCell``.

Methods (``PRUNE_METHODS``):

- ``global``: one magnitude threshold over all prunable weights, so layers whose weights are
  small lose more of them;
- ``layerwise``: every prunable tensor loses the same fraction of its own smallest weights;
- ``gradual``: global masks whose sparsity rises step by step over the fine-tuning on the cubic
  schedule of Zhu & Gupta (2017), ``s_t = s * (1 - (1 - t / T) ** 3)`` after optimizer step ``t``
  of ``T``. The last step trains at exactly ``s``; only the last epoch (which ends there) is
  eligible as the kept checkpoint. Step-wise, one fine-tuning epoch is still gradual;
- ``lamp``: one threshold over LAMP scores (Lee et al. 2021), ``w_u^2 / sum of w_v^2 over the
  tensor's weights at least as large``: magnitude relative to what the tensor keeps, so a layer of
  small weights (a wide-fan-in projection) is not emptied. Global magnitude at 90% removes 99-100%
  of Up-Down's feature projections and of the Transformer's feed-forward layers;
- ``gradual_lamp``: ``gradual``'s schedule over LAMP scores.

Exactly ``round(ratio * n)`` weights are pruned: ties at the threshold are broken by position
(parameter order, then row-major), so the same weights always give the same masks. Weights
pruned earlier are pruned first again, so masks only ever lose entries.

A ``Pruner`` is a hook of the training loop (``captioning.training.loop.fit``): masks are
(re)computed at each epoch start, gradients of pruned weights are zeroed before the optimizer
step and the weights are re-zeroed after it, so Adam's momentum cannot revive them. Its masks
travel in the training resume file, so a resumed run gives the same weights. ``FixedMask`` is the
same hook with masks that never change: the zeros a checkpoint already has (SCST of a pruned
model). This module knows nothing of training; training imports it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class PruneMethod:
    scope: str       # "global": one threshold over all prunable weights; "layerwise": one per tensor
    gradual: bool    # sparsity follows the cubic schedule over the epochs instead of starting at the target
    help: str


PRUNE_METHODS: dict[str, PruneMethod] = {
    "global": PruneMethod("global", False, "smallest |w| over all prunable decoder weights, once"),
    "layerwise": PruneMethod("layerwise", False, "smallest |w| of each prunable tensor, same ratio each, once"),
    "gradual": PruneMethod("global", True, "global, sparsity rising over the epochs (cubic, Zhu & Gupta 2017)"),
    "lamp": PruneMethod("lamp", False, "smallest LAMP score (|w|^2 relative to the larger weights of its tensor), once"),
    "gradual_lamp": PruneMethod("lamp", True, "lamp, sparsity rising over the epochs as gradual's"),
}


def _method(name: str) -> PruneMethod:
    if name not in PRUNE_METHODS:
        raise UserError(f"unknown pruning method {name!r}; known: {', '.join(PRUNE_METHODS)}")
    return PRUNE_METHODS[name]


def _check_ratio(ratio) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise UserError(f"pruning ratio {ratio!r} is not a number") from None
    if not 0.0 <= r < 1.0:
        raise UserError(f"pruning ratio {r} must be in [0, 1)")
    return r


# ---- which weights, and how sparse they are ---------------------------------------------------

def prunable(decoder: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter with dim >= 2 (matrices and embeddings, not biases), in parameter order.

    Shared (tied) parameters appear once, under their first name.
    """
    return {n: p for n, p in decoder.named_parameters() if p.dim() >= 2}


def measured_sparsity(decoder_or_state) -> dict:
    """Fraction of exact zeros, read from the weights themselves.

    Accepts a decoder, a state dict, or the path of a safetensors file. Returns {"sparsity":
    over the prunable weights, "sparsity_all": over all parameters}. For a state dict the
    prunable weights are its floating tensors with dim >= 2 (a decoder's state dict holds only
    parameters, unless it registers persistent buffers).
    """
    if isinstance(decoder_or_state, (str, os.PathLike)):
        from ..io import load_tensors

        decoder_or_state = load_tensors(decoder_or_state)[0]
    if isinstance(decoder_or_state, nn.Module):
        tensors = dict(decoder_or_state.named_parameters())
    else:
        tensors = {k: v for k, v in decoder_or_state.items() if torch.is_tensor(v) and v.is_floating_point()}
    zeros = {k: int((v == 0).sum()) for k, v in tensors.items()}
    big = [k for k, v in tensors.items() if v.dim() >= 2]

    def frac(keys):
        n = sum(tensors[k].numel() for k in keys)
        return sum(zeros[k] for k in keys) / n if n else 0.0

    return {"sparsity": frac(big), "sparsity_all": frac(list(tensors))}


# ---- masks ----------------------------------------------------------------------------------------

@torch.no_grad()
def _keep_smallest_out(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask that drops exactly the ``k`` smallest scores; ties go to the earlier position."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    thr = scores.kthvalue(k).values
    below = scores < thr
    keep[below] = False
    tied = torch.nonzero(scores == thr).squeeze(1)
    keep[tied[:k - int(below.sum())]] = False
    return keep


@torch.no_grad()
def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score of each entry of ``w`` (flat): ``w_u^2 / sum(w_v^2 for |w_v| >= |w_u|)``, in [0, 1].

    The largest weight of every tensor scores 1, so one threshold over all tensors never empties
    one. Equal magnitudes are ordered by position, as ``_keep_smallest_out`` breaks ties.
    """
    flat = w.detach().flatten()
    order = torch.sort(flat.abs(), stable=True).indices  # float32 |w| sorts as its exact double squares
    sq = flat.double() ** 2
    tail = sq[order].flip(0).cumsum(0).flip(0)  # sum of the squares from each rank upwards
    out = torch.empty_like(sq)
    out[order] = sq[order] / tail.clamp_min(torch.finfo(torch.float64).tiny)
    return out


def _magnitude(w: torch.Tensor) -> torch.Tensor:
    return w.abs().float()


@torch.no_grad()
def _masks_for(weights: list[torch.Tensor], ratio: float, previous: list[torch.Tensor | None],
               score=_magnitude) -> list[torch.Tensor]:
    """One threshold over the ``score`` of the entries of ``weights`` that ``previous`` still keeps.

    Entries pruned before stay pruned and count towards ``ratio``; only the kept ones are scored and
    searched. A gradual schedule's steps past its first few find most weights already pruned, so each
    search sorts a fraction of them (a pruned weight is zero in training, so it adds nothing to a LAMP
    sum either way). ``score`` maps a flat tensor to one score per entry.
    """
    kept, scores = [], []
    for w, prev in zip(weights, previous):
        flat = w.detach().flatten()
        ix = None if prev is None else torch.nonzero(prev.flatten().to(flat.device)).squeeze(1)
        kept.append(ix)
        scores.append(score(flat if ix is None else flat[ix]))
    n = sum(w.numel() for w in weights)
    already = n - sum(s.numel() for s in scores)
    keep = _keep_smallest_out(torch.cat(scores), max(round(ratio * n), already) - already)
    masks = []
    for w, ix, part in zip(weights, kept, keep.split([s.numel() for s in scores])):
        if ix is not None:
            full = torch.zeros(w.numel(), dtype=torch.bool, device=part.device)
            part = full.index_fill_(0, ix[part], True)
        masks.append(part.view_as(w))
    return masks


def make_masks(decoder: nn.Module, method: str, ratio: float,
               previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{name: bool tensor (True = keep)} pruning ``ratio`` of the prunable weights by magnitude.

    ``method`` picks the scope (``gradual`` prunes globally, ``gradual_lamp`` by LAMP score; the
    schedule lives in ``Pruner``). Weights masked out in ``previous`` stay masked out.
    """
    scope, ratio = _method(method).scope, _check_ratio(ratio)
    params = prunable(decoder)
    names = list(params)
    prev = [previous.get(n) if previous else None for n in names]
    if scope == "global":
        masks = _masks_for([params[n] for n in names], ratio, prev)
    elif scope == "lamp":
        masks = _masks_for([params[n] for n in names], ratio, prev, score=lamp_scores)
    else:
        masks = [_masks_for([params[n]], ratio, [p])[0] for n, p in zip(names, prev)]
    return dict(zip(names, masks))


# ---- the training hooks -------------------------------------------------------------------------

class FixedMask:
    """Holds masked-out parameter entries at zero through training; the hooks ``loop.fit`` calls.

    Masks never change here, and any parameter may carry one (biases too). ``Pruner`` adds the
    schedule that computes them.
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None):
        self.masks: dict[str, torch.Tensor] | None = None
        self._drop: dict[str, torch.Tensor] = {}  # ~masks, cached for the per-step hooks
        if masks is not None:
            self._set_masks(masks)

    @classmethod
    def from_zeros(cls, decoder: nn.Module) -> "FixedMask":
        """Keep every entry that is exactly zero now at zero (e.g. a pruned checkpoint's pruned weights)."""
        return cls({n: p.detach() != 0 for n, p in decoder.named_parameters() if bool((p == 0).any())})

    def on_epoch_start(self, decoder: nn.Module, epoch: int, steps: int | None = None) -> None:
        pass

    def on_step(self, decoder: nn.Module, epoch: int, step: int, steps: int) -> None:
        pass

    def at_target(self, epoch: int) -> bool:
        """True once the final sparsity is in force: only such epochs may become the kept checkpoint."""
        return True

    @torch.no_grad()
    def before_step(self, decoder: nn.Module) -> None:
        """Zero the gradients of masked weights (so clipping and Adam's moments ignore them)."""
        for n, p in decoder.named_parameters():
            if n in self._drop and p.grad is not None:
                p.grad.masked_fill_(self._drop[n], 0.0)

    @torch.no_grad()
    def after_step(self, decoder: nn.Module) -> None:
        """Re-zero masked weights: Adam's momentum would otherwise move them again."""
        for n, p in decoder.named_parameters():
            if n in self._drop:
                p.masked_fill_(self._drop[n], 0.0)

    def _set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self._drop = {n: ~m for n, m in masks.items()}

    # resume: fixed masks are re-derived from the starting checkpoint, so the resume file holds none
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], decoder: nn.Module) -> None:
        pass


class Pruner(FixedMask):
    """Magnitude pruning during fine-tuning: masks computed by ``method`` at ``ratio``, on a schedule.

    Epochs are 0-based here. ``epochs`` is the schedule length: only ``gradual`` uses it, and
    training longer than it simply stays at the final ratio.
    """

    def __init__(self, method: str, ratio: float, epochs: int = 1):
        super().__init__()
        self.method, self.spec, self.ratio = method, _method(method), _check_ratio(ratio)
        if int(epochs) < 1:
            raise UserError(f"pruning schedule needs at least 1 epoch, got {epochs}")
        self.epochs = int(epochs)
        self._masks_ratio = None  # the ratio self.masks were computed at (None: unknown, e.g. resumed)

    def ratio_at(self, epoch: int, frac: float = 1.0) -> float:
        """The sparsity in force ``frac`` of the way through ``epoch`` (by the end of it, by default)."""
        if not self.spec.gradual:
            return self.ratio
        t = min(max(epoch + frac, 0.0) / self.epochs, 1.0)
        return self.ratio * (1.0 - (1.0 - t) ** 3)

    def at_target(self, epoch: int) -> bool:
        return not self.spec.gradual or epoch >= self.epochs - 1

    def on_epoch_start(self, decoder: nn.Module, epoch: int, steps: int | None = None) -> None:
        """(Re)compute the masks for this epoch's sparsity and zero the pruned weights.

        With ``steps`` (the epoch's optimizer steps), ``gradual`` starts at its first step's
        sparsity and ``on_step`` raises it step by step; without, it takes the epoch's final one.
        For fixed methods the masks of the first call are kept (recomputing gives the same ones).
        """
        frac = 1.0 / steps if self.spec.gradual and steps else 1.0
        self._prune_to(decoder, self.ratio_at(epoch, frac))

    def on_step(self, decoder: nn.Module, epoch: int, step: int, steps: int) -> None:
        """Before optimizer step ``step`` (0-based) of ``steps``: ``gradual`` raises the sparsity.

        Step-wise, the schedule stays gradual even over a single fine-tuning epoch.
        """
        if self.spec.gradual and step > 0:
            self._prune_to(decoder, self.ratio_at(epoch, (step + 1) / steps))

    def _prune_to(self, decoder: nn.Module, ratio: float) -> None:
        """Masks at ``ratio`` (never reviving what is already pruned), and the pruned weights zeroed.

        At the ratio the masks already have, recomputing gives them back unchanged (what was pruned
        is pruned first, and exactly as many), so it is skipped: the steps after a gradual schedule
        ends, and every epoch of a one-shot method, cost no mask search (a LAMP search sorts every
        weight still kept: for the 768-wide Up-Down's 19M, 14 s dense, 6.8 s at 50% sparsity and
        1.6 s at 85% on one busy core).
        """
        if self.masks is None or ratio != self._masks_ratio:
            self._set_masks(make_masks(decoder, self.method, ratio, previous=self.masks))
            self._masks_ratio = ratio
        self.after_step(decoder)

    def describe(self) -> dict:
        """What makes two pruners equivalent (for settings and resume matching)."""
        d = {"method": self.method, "scope": self.spec.scope, "ratio": self.ratio}
        if self.spec.gradual:
            d.update(schedule="cubic", schedule_epochs=self.epochs)
        return d

    # resume: the masks as tensors, since they cannot always be re-derived from the weights
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"mask.{n}": m for n, m in (self.masks or {}).items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], decoder: nn.Module) -> None:
        params = prunable(decoder)
        masks = {k[5:]: v for k, v in tensors.items() if k.startswith("mask.")}
        if not masks:
            return
        if set(masks) != set(params) or any(masks[n].shape != params[n].shape for n in params):
            raise UserError("resume file: pruning masks do not match the decoder's weights")
        self._set_masks({n: masks[n].to(device=params[n].device, dtype=torch.bool) for n in params})


__all__ = ["PRUNE_METHODS", "PruneMethod", "FixedMask", "Pruner", "prunable", "make_masks", "measured_sparsity", "lamp_scores"]
