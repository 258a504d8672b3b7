"""A whole captioning model: raw image -> encoder -> decoder -> words.

This is what evaluation times and what an artifact loads into, so encoder
changes and compression count in every number the table reports.

The caption length limit (``max_length``) travels with the data: ``pack_variant`` takes it from the
prepared dataset's ``vocab.json`` (``max_length``), the artifact stores it (config key ``max_len``,
kept from the first artifacts so they still load)
and ``load_captioner`` reads it back; there is no default.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .compress import artifact
from .compress.quantize import QUANT_MODES, apply_runtime, check_mode, encoding_for, roundtrip
from .data.images import load_tensor
from .encoders import create_encoder, load_encoder
from .errors import UserError
from .models import create_decoder, load_decoder
from .timing import model_work
from .utils import pick_device


class Captioner:
    def __init__(self, encoder, decoder, itow: dict[int, str], max_length: int, device: str = "cpu"):
        self.encoder = encoder.eval().to(device)
        self.decoder = decoder.eval().to(device)
        self.itow = itow
        self.max_length = max_length
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
        seq = beam_search(self.decoder, fc, att, beam_size=beam_size, max_length=self.max_length)
        return [decode(self.itow, s) for s in seq.tolist()]

    def caption_files(self, paths, beam_size: int = 3, batch_size: int = 16) -> list[str]:
        out = []
        for i in range(0, len(paths), batch_size):
            out += self.caption_images(self.images(paths[i:i + batch_size]), beam_size)
        return out


def _build(encoder_config: dict, decoder_config: dict, groups, itow, max_length: int, mode: str,
           device: str, source: str) -> Captioner:
    """A Captioner from configs and stored (decoded) weights, computing in ``mode``.

    Shared by ``load_captioner`` and ``quantize_captioner`` so both give the same model.
    """
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
    cap = Captioner(encoder, decoder, itow, max_length, device)
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
                  captioner.max_length, mode, captioner.device, "captioner")


def _max_length(value, where: str, key: str) -> int:
    """A caption length limit (given, or read from a file): an integer >= 1, else a one-line UserError."""
    if value is None:
        raise UserError(f"{where}: no '{key}' (the caption length limit)")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{where}: '{key}' must be an integer >= 1, got {value!r}")
    return value


def pack_model(out, encoder, decoder, itow: dict[int, str], max_length: int,
               extra: dict | None = None, quantization: str = "fp32") -> int:
    """Write encoder + decoder + vocabulary + caption length limit as one artifact, tensors stored
    per ``quantization`` (see ``compress.quantize``); returns its size in bytes."""
    mode, max_length = check_mode(quantization), _max_length(max_length, str(out), "max_length")
    config = {"encoder": encoder.config(), "decoder": decoder.config,
              "vocab": {str(k): v for k, v in itow.items()}, "max_len": max_length,
              **(extra or {}), "runtime": {"quantization": mode}}
    groups = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}
    return artifact.pack(out, groups, config, lambda g, n, t: encoding_for(mode, g, n, t))


@model_work
def pack_variant(out, encoder_path, decoder_path, prepared_dir, quantization: str = "fp32",
                 meta: dict | None = None) -> tuple[int, dict]:
    """Pack an encoder file and a decoder file with the prepared dataset's vocabulary and
    ``max_length`` into the artifact ``out``; returns (its size in bytes, its storage record).

    The artifact's config also holds ``variant`` (``meta``: what this variant is) and ``storage``:
    the decoder's measured sparsity and the theoretical storage floor for ``quantization``.
    """
    from .compress.prune import measured_sparsity
    from .compress.quantize import storage_floor_bytes
    from .data.prepare import load_vocab
    from .io import read_json

    encoder, decoder = load_encoder(encoder_path), load_decoder(decoder_path)
    groups = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}
    storage = {**measured_sparsity(decoder), "floor_bytes": storage_floor_bytes(groups, quantization)}
    itow, vocab_json = load_vocab(prepared_dir), Path(prepared_dir) / "vocab.json"
    max_length = _max_length(read_json(vocab_json).get("max_length"), str(vocab_json), "max_length")
    size = pack_model(out, encoder, decoder, itow, max_length=max_length,
                      extra={"variant": meta or {}, "storage": storage}, quantization=quantization)
    return size, storage


def load_captioner(path: str | Path, device: str = "cpu") -> Captioner:
    """Rebuild a Captioner from an artifact alone: no dataset, config or network needed.

    ``device`` "auto" means CUDA when present. An int8 artifact runs on CPU whatever ``device``
    says (dynamic int8 is CPU-only).
    """
    device = pick_device(device)
    config, groups = artifact.read(path)
    try:
        encoder_config, decoder_config = config["encoder"], config["decoder"]
        itow = {int(k): v for k, v in config["vocab"].items()}
        mode = config.get("runtime", {}).get("quantization", "fp32")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{path}: artifact config is incomplete or malformed ({type(e).__name__}: {e})") from None
    max_length = _max_length(config.get("max_len"), str(path), "max_len")
    if mode not in QUANT_MODES:
        raise UserError(f"{path}: unknown quantization '{mode}' (known: {', '.join(QUANT_MODES)})")
    cap = _build(encoder_config, decoder_config, groups, itow, max_length, mode, device, str(path))
    cap.config = config
    return cap
