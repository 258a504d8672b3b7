"""Mixed precision and the optimizer step, shared by every training stage.

GPU-only: on CPUs without fp16/bf16 units, such as this project's machines, low-precision
compute is 4 to 30 times slower than fp32, so ``amp`` there prints a one-time note and trains
in fp32. Validation decoding always stays fp32, as the evaluation stage decodes.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from ..errors import UserError

# Device type -> autocast dtype. CUDA only: on CPUs without fp16/bf16 units, such as this
# project's machines, low-precision compute is 4 to 30 times slower than fp32.
AMP_DTYPES: dict[str, torch.dtype] = {"cuda": torch.float16}
_amp_noted: set[str] = set()  # device types already told that amp does nothing there


class MixedPrecision:
    """The ``amp`` option of a training loop: fp16 autocast plus loss scaling where ``AMP_DTYPES`` allows.

    fp16 gradients of small losses underflow to 0, so the ``GradScaler`` multiplies the loss
    before ``backward``, divides the gradients again before anything reads them, skips steps
    whose gradients overflowed and adapts its factor. Inactive (amp off, or another device),
    ``autocast()`` does nothing and the scaler passes everything through, so the run is the
    plain fp32 run bit for bit. Only forward passes go under ``autocast()``; losses are fp32.
    """

    def __init__(self, amp: bool, device: str, who: str = "train"):
        self.kind = torch.device(device).type
        self.dtype = AMP_DTYPES.get(self.kind) if amp else None
        if amp and self.dtype is None and self.kind not in _amp_noted:
            _amp_noted.add(self.kind)
            print(f"{who}: amp is a no-op on {self.kind} (float16/bfloat16 compute is slower than float32 "
                  "there); training in float32", file=sys.stderr)
        self.scaler = torch.amp.GradScaler(self.kind, enabled=self.active)

    @property
    def active(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        return torch.autocast(self.kind, dtype=self.dtype) if self.active else contextlib.nullcontext()

    def state(self) -> dict:
        """The scaler's state as plain numbers (for the resume file's metadata); {} when inactive."""
        return {k: v.item() if torch.is_tensor(v) else v for k, v in self.scaler.state_dict().items()}

    def load_state(self, state: dict | None, path) -> None:
        """Continue with a saved scale; without one (e.g. the run began on a CPU) the scaler starts afresh."""
        if not (self.active and state):
            return
        try:
            self.scaler.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"{path}: unreadable amp scaler state ({e!r})") from None


def optimizer_step(loss: torch.Tensor, decoder: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, grad_clip: float, before_step=None, after_step=None) -> None:
    """Backward and one step, in the order AMP and pruning need.

    Gradients are unscaled first (nothing to do without AMP), so ``before_step(decoder)`` (zeroing
    pruned weights' gradients) and clipping by value (``grad_clip`` > 0) see the true ones. The
    scaler skips the step when a gradient is inf/NaN; ``after_step(decoder)`` runs either way.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if before_step is not None:
        before_step(decoder)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_value_(decoder.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if after_step is not None:
        after_step(decoder)
