"""Caption decoders: the registry (``registry.py``), the families, and safe (safetensors) save/load.

Adding a decoder means adding one file that subclasses ``CaptionDecoder`` and decorates the
class with ``@register_decoder("name")``, then adding it to the family import below.
"""
from __future__ import annotations

import os

from ..errors import UserError
from ..io import load_tensors, save_tensors
from .base import CaptionDecoder
from .registry import create_decoder, list_decoders, register_decoder

# The families, after the registry: importing them runs their @register_decoder lines.
from . import aoanet, transformer, updown  # noqa: F401  isort: skip

FORMAT = "captioning.decoder/1"


def save_decoder(decoder: CaptionDecoder, path: str | os.PathLike, extra_meta: dict | None = None) -> None:
    """Weights as safetensors, the architecture config (and ``extra_meta``) in its JSON metadata."""
    meta = {"format": FORMAT, "config": decoder.config, **(extra_meta or {})}
    save_tensors(path, decoder.state_dict(), meta)


def load_decoder(path: str | os.PathLike, device: str = "cpu") -> CaptionDecoder:
    """Rebuild a decoder saved by ``save_decoder``; returned in eval mode. Never unpickles."""
    tensors, meta = load_tensors(path)
    cfg = meta.get("config")
    if meta.get("format") != FORMAT or not isinstance(cfg, dict) or "name" not in cfg:
        raise UserError(f"{path}: not a decoder file (no '{FORMAT}' config in its metadata)")
    decoder = create_decoder(**cfg)
    try:
        decoder.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{path}: weights do not match its config ({' '.join(first[:2])})") from None
    return decoder.to(device).eval()


def read_decoder_meta(path: str | os.PathLike) -> dict:
    """The metadata of a decoder file (config, epoch, scores ...) without reading its weights."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except (SafetensorError, OSError, ValueError, RecursionError) as e:  # a bad header, or metadata not JSON
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


__all__ = [
    "CaptionDecoder", "register_decoder", "create_decoder", "list_decoders",
    "save_decoder", "load_decoder", "read_decoder_meta",
]
