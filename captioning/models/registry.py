"""The decoder registry: one name per class, one constructor for all of them (as ``timm.create_model``).

A family registers itself by decorating its class with ``@register_decoder("name")``; the family
modules are imported by ``captioning.models``, so importing that package fills the registry.
"""
from __future__ import annotations

from ..errors import UserError
from .base import CaptionDecoder

_REGISTRY: dict[str, type[CaptionDecoder]] = {}


def register_decoder(name: str):
    """Class decorator: make ``create_decoder(name, ...)`` build this class."""

    def wrap(cls: type[CaptionDecoder]) -> type[CaptionDecoder]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"decoder {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_decoders() -> list[str]:
    return sorted(_REGISTRY)


def create_decoder(name: str, vocab_size: int, feat_dim: int, **cfg) -> CaptionDecoder:
    """Build a registered decoder; unknown names or settings are a UserError."""
    if name not in _REGISTRY:
        raise UserError(f"unknown decoder {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    known = getattr(cls, "config_keys", None)
    if known is not None:
        bad = sorted(set(cfg) - set(known))
        if bad:
            raise UserError(f"decoder {name!r}: unknown setting(s) {', '.join(bad)}; known: {', '.join(known)}")
    return cls(vocab_size=int(vocab_size), feat_dim=int(feat_dim), **cfg)
