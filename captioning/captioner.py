"""A whole captioning model: raw image -> encoder -> decoder -> words.

This is what evaluation times and what an artifact loads into, so encoder
changes and compression count in every number the table reports.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .compress import artifact
from .compress.quantize import QUANT_MODES, apply_runtime, check_mode, encoding_for, roundtrip
from .data.images import load_tensor
from .errors import UserError


class Captioner:
    def __init__(self, encoder, decoder, itow: dict[int, str], max_len: int = 16, device: str = "cpu"):
        self.encoder = encoder.eval().to(device)
        self.decoder = decoder.eval().to(device)
        self.itow = itow
        self.max_len = max_len
        self.device = device
        self.quantization = "fp32"
        # the weights as stored (fp32 view), kept when the runtime modules hold packed int8 instead
        self.stored: dict[str, dict[str, torch.Tensor]] | None = None

    def parameters(self):
        yield from self.encoder.parameters()
        yield from self.decoder.parameters()

    def state_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"encoder": state dict, "decoder": state dict} of float tensors, also for an int8 model."""
        if self.stored is not None:
            return self.stored
        return {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict()}

    def images(self, paths) -> torch.Tensor:
        e = self.encoder
        return torch.stack([load_tensor(p, e.img_size, e.mean, e.std) for p in paths])

    @torch.no_grad()
    def caption_images(self, images: torch.Tensor, beam_size: int = 3) -> list[str]:
        from .data.prepare import decode
        from .models.search import beam_search

        fc, att = self.encoder(images.to(self.device))
        seq = beam_search(self.decoder, fc, att, beam_size=beam_size, max_len=self.max_len)
        return [decode(self.itow, s) for s in seq.tolist()]

    def caption_files(self, paths, beam_size: int = 3, batch_size: int = 16) -> list[str]:
        out = []
        for i in range(0, len(paths), batch_size):
            out += self.caption_images(self.images(paths[i:i + batch_size]), beam_size)
        return out


def _build(encoder_config: dict, decoder_config: dict, groups, itow, max_len: int, mode: str,
           device: str, source: str) -> Captioner:
    """A Captioner from configs and stored (decoded) weights, computing in ``mode``.

    Shared by ``load_captioner`` and ``quantize_captioner`` so both give the same model.
    """
    from .encoders import create_encoder
    from .models import create_decoder

    try:
        encoder = create_encoder(encoder_config["timm_name"], img_size=encoder_config["img_size"],
                                 mean=encoder_config["mean"], std=encoder_config["std"])
        decoder = create_decoder(**decoder_config)
    except (KeyError, TypeError) as e:
        raise UserError(f"{source}: model config is incomplete ({type(e).__name__}: {e})") from None
    for group, module in (("encoder", encoder), ("decoder", decoder)):
        try:
            module.load_state_dict(groups[group])
        except (KeyError, RuntimeError) as e:
            lines = str(e).strip().splitlines()
            raise UserError(f"{source}: {group} weights do not match its config ({' '.join(lines[:2])})") from None
    if mode == "int8":
        device = "cpu"  # dynamic int8 kernels exist on CPU only
    cap = Captioner(encoder, decoder, itow, max_len, device)
    apply_runtime(cap, mode)
    cap.quantization = mode
    if mode == "int8":
        cap.stored = groups
    return cap


def quantize_captioner(captioner: Captioner, mode: str) -> Captioner:
    """A new Captioner holding exactly what ``pack_model(..., quantization=mode)`` then
    ``load_captioner`` would give: same weights, same runtime, hence the same captions."""
    check_mode(mode)
    groups = roundtrip(captioner.state_groups(), mode)
    return _build(captioner.encoder.config(), captioner.decoder.config, groups, captioner.itow,
                  captioner.max_len, mode, captioner.device, "captioner")


def pack_model(out, encoder, decoder, itow: dict[int, str], max_len: int = 16,
               extra: dict | None = None, quantization: str = "fp32") -> int:
    """Write encoder + decoder + vocabulary as one artifact, tensors stored per ``quantization``
    (see ``compress.quantize``); returns its size in bytes."""
    mode = check_mode(quantization)
    config = {"encoder": encoder.config(), "decoder": decoder.config,
              "vocab": {str(k): v for k, v in itow.items()}, "max_len": max_len,
              **(extra or {}), "runtime": {"quantization": mode}}
    groups = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}
    return artifact.pack(out, groups, config, lambda g, n, t: encoding_for(mode, g, n, t))


def load_captioner(path: str | Path, device: str = "cpu") -> Captioner:
    """Rebuild a Captioner from an artifact alone: no dataset, config or network needed.

    An int8 artifact runs on CPU whatever ``device`` says (dynamic int8 is CPU-only).
    """
    config, groups = artifact.read(path)
    try:
        encoder_config, decoder_config = config["encoder"], config["decoder"]
        itow = {int(k): v for k, v in config["vocab"].items()}
        mode = config.get("runtime", {}).get("quantization", "fp32")
        max_len = config.get("max_len", 16)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{path}: artifact config is incomplete or malformed ({type(e).__name__}: {e})") from None
    if mode not in QUANT_MODES:
        raise UserError(f"{path}: unknown quantization '{mode}' (known: {', '.join(QUANT_MODES)})")
    cap = _build(encoder_config, decoder_config, groups, itow, max_len, mode, device, str(path))
    cap.config = config
    return cap
