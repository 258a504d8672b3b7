"""Caption decoders: a registry, one constructor, and safe (safetensors) save/load.

Adding a decoder means adding one file that subclasses ``CaptionDecoder`` and decorates the
class with ``@register_decoder("name")``, then naming the module in ``_DECODER_MODULES``.
"""
from __future__ import annotations

import importlib
import os

from ..errors import UserError
from ..io import load_tensors, save_tensors
from .base import CaptionDecoder

FORMAT = "captioning.decoder/1"

_REGISTRY: dict[str, type[CaptionDecoder]] = {}

# Modules whose import registers decoders; a module not written yet is skipped.
_DECODER_MODULES = ("updown", "aoanet", "transformer")


def register_decoder(name: str):
    """Class decorator: make ``create_decoder(name, ...)`` build this class."""

    def wrap(cls: type[CaptionDecoder]) -> type[CaptionDecoder]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"decoder {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    for mod in _DECODER_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


def list_decoders() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_decoder(name: str, vocab_size: int, feat_dim: int, **cfg) -> CaptionDecoder:
    """Build a registered decoder; unknown names or settings are a UserError."""
    _load_builtin()
    if name not in _REGISTRY:
        raise UserError(f"unknown decoder {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    known = getattr(cls, "config_keys", None)
    if known is not None:
        bad = sorted(set(cfg) - set(known))
        if bad:
            raise UserError(f"decoder {name!r}: unknown setting(s) {', '.join(bad)}; known: {', '.join(known)}")
    return cls(vocab_size=int(vocab_size), feat_dim=int(feat_dim), **cfg)


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

    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as e:  # safetensors raises several types for a bad header
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


__all__ = [
    "CaptionDecoder", "register_decoder", "create_decoder", "list_decoders",
    "save_decoder", "load_decoder", "read_decoder_meta",
]
