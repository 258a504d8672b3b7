"""Export a captioning model to ONNX as three graphs, so any runtime can drive the decoder step by step.

The decoder interface (``captioning.models.base``) is a loop, not one graph: beam search needs
to reorder and stop between steps. So a model becomes:

    encoder   images [B, 3, S, S]                 -> fc [B, C], att [B, N, C]
    init      fc, att                             -> ctx_0 .. ctx_{m-1}, state_0 .. state_{n-1}
    step      tokens [B] int64, state_0 .., ctx_0 .. -> logprobs [B, V+1], new_state_0 .. new_state_{n-1}

``init`` is ``decoder.prepare`` followed by ``decoder.init_state``; a loop feeds ``new_state_i`` of
one step as ``state_i`` of the next (ONNX forbids one name for a graph input and an output). A
graph drops inputs it does not use (the Transformer's init has no ``fc``). Dim 0 of every tensor
is the batch and is dynamic (beam search runs images × beams rows). State axes that grow
from step to step (the Transformer's key/value cache: [B, t, d]) are dynamic too; they are found
by running the decoder, not by family, so a new decoder family needs no code here.

Graphs come back as ONNX model bytes: ``onnxruntime.InferenceSession`` takes them as they are.
The legacy TorchScript exporter (``dynamo=False``, opset 17) handles every family without changes;
its TracerWarning about ``math.sqrt`` of a head width is harmless (the width is fixed per model).
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager

import torch
from torch import nn

OPSET = 17
ENCODER_INPUTS, ENCODER_OUTPUTS = ("images",), ("fc", "att")


def names(prefix: str, n: int) -> list[str]:
    """The graph names of a tuple of tensors: ``prefix_0 .. prefix_{n-1}``."""
    return [f"{prefix}_{i}" for i in range(n)]


class _Init(nn.Module):
    """``prepare`` then ``init_state``, flattened into one output tuple: ctx first, then state."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, fc, att):
        ctx = self.decoder.prepare(fc, att)
        return (*ctx, *self.decoder.init_state(ctx))


class _Step(nn.Module):
    """``step`` with flat inputs (tokens, state..., ctx...) and flat outputs (logprobs, state...)."""

    def __init__(self, decoder, n_state: int):
        super().__init__()
        self.decoder, self.n_state = decoder, n_state

    def forward(self, tokens, *tensors):
        logprobs, state = self.decoder.step(tokens, tensors[:self.n_state], tensors[self.n_state:])
        return (logprobs, *state)


@contextmanager
def _eval(module: nn.Module):
    """Eval mode (no dropout) while exporting, then the caller's mode back."""
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter is chosen on purpose: it needs no onnxscript
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(module, args, buf, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def export_encoder(encoder, batch: int = 2) -> bytes:
    """The encoder graph, images -> (fc, att), for the encoder's own image size."""
    images = torch.zeros(batch, 3, encoder.img_size, encoder.img_size, device=next(encoder.parameters()).device)
    axes = {n: {0: "batch"} for n in (*ENCODER_INPUTS, *ENCODER_OUTPUTS)}
    with torch.no_grad(), _eval(encoder):
        return _export(encoder, (images,), list(ENCODER_INPUTS), list(ENCODER_OUTPUTS), axes)


def export_decoder(decoder, fc: torch.Tensor, att: torch.Tensor, steps: int = 3) -> tuple[bytes, bytes]:
    """The (init, step) graphs of ``decoder`` in eval mode, traced on example features ``fc``, ``att``.

    Use a batch of at least 2 so no batch size gets baked in. The step is traced after ``steps``
    steps, so a growing state axis has a non-zero length that differs from the batch.
    """
    with torch.no_grad(), _eval(decoder):
        ctx = decoder.prepare(fc, att)
        state = first = decoder.init_state(ctx)
        tokens = torch.zeros(fc.shape[0], dtype=torch.long, device=fc.device)
        for _ in range(steps):
            logprobs, state = decoder.step(tokens, state, ctx)
            tokens = logprobs.argmax(1)
        ctx_names, state_names, new_names = names("ctx", len(ctx)), names("state", len(state)), names(
            "new_state", len(state))
        init_axes = {n: {0: "batch"} for n in ("fc", "att", *ctx_names, *state_names)}
        step_axes = {n: {0: "batch"} for n in ("tokens", "logprobs", *ctx_names, *state_names, *new_names)}
        for i, (before, after) in enumerate(zip(first, state)):
            for d in range(1, after.ndim):
                if before.shape[d] != after.shape[d]:  # grows per step: [B, t, d] in, [B, t+1, d] out
                    init_axes[state_names[i]][d] = step_axes[state_names[i]][d] = f"state_{i}_dim{d}"
                    step_axes[new_names[i]][d] = f"new_state_{i}_dim{d}"
        # the wrappers are in eval mode too: the exporter puts a module back in its own mode afterwards
        init = _export(_Init(decoder).eval(), (fc, att), ["fc", "att"], ctx_names + state_names, init_axes)
        step = _export(_Step(decoder, len(state)).eval(), (tokens, *state, *ctx), ["tokens", *state_names, *ctx_names],
                       ["logprobs", *new_names], step_axes)
    return init, step


def export_captioner(captioner, batch: int = 2) -> dict[str, bytes]:
    """{"encoder", "init", "step"}: a float ``Captioner``'s three graphs, traced on blank images.

    An int8 captioner runs torch's own quantized kernels, which have no ONNX form: export its fp32
    model and quantize the ONNX graphs instead.
    """
    if captioner.quantization == "int8":
        raise ValueError("cannot export an int8 Captioner (torch dynamic int8 modules): export the float model")
    encoder = captioner.encoder
    with torch.no_grad(), _eval(encoder):
        fc, att = encoder(torch.zeros(batch, 3, encoder.img_size, encoder.img_size, device=captioner.device))
    init, step = export_decoder(captioner.decoder, fc, att)
    return {"encoder": export_encoder(encoder, batch), "init": init, "step": step}
