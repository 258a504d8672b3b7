"""The decoder registry: one name per class, one constructor for all of them (as ``timm.create_model``).

A family registers itself by decorating its class with ``@register_decoder("name")``; the family
modules are imported by ``captioning.models``, so importing that package fills the registry.
"""
from __future__ import annotations

import dataclasses
import numbers

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


# Bounds on every integer setting, wide enough for any published captioner (COCO: V = 9487, widths
# <= 2048, 6 + 6 layers, 8 heads): a config read from a stranger's artifact cannot ask for more.
MAX_VOCAB = 1_000_000
MAX_WIDTH = 65_536
INT_BOUNDS = {"vocab_size": (1, MAX_VOCAB), "num_heads": (1, 1024), "refiner_layers": (0, 64),
              "enc_layers": (0, 64), "dec_layers": (1, 64)}  # any other integer is a width: 1..MAX_WIDTH


def check_settings(name: str, config_class, settings: dict) -> dict:
    """``settings`` with its integers as ``int``, after every value is checked against its field's type
    and bounds: a one-line UserError naming the key otherwise. Floats are dropout probabilities."""
    out = dict(settings)
    for f in dataclasses.fields(config_class):
        if f.name not in settings:
            continue
        v, kind = settings[f.name], str(f.type)
        if v is None and "None" in kind:
            continue
        if kind == "bool":
            ok = isinstance(v, bool)
        elif kind.startswith("int"):
            lo, hi = INT_BOUNDS.get(f.name, (1, MAX_WIDTH))
            ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= hi
            want = f"an integer in [{lo}, {hi}]" + (" or null" if "None" in kind else "")
            if ok:
                out[f.name] = int(v)
        else:  # float
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 1
            want = "a probability in [0, 1]"
        if not ok:
            raise UserError(f"{name}: {f.name} must be {'true or false' if kind == 'bool' else want}, "
                            f"got {v!r}")
    return out


def create_decoder(name: str, vocab_size: int, feat_dim: int, **cfg) -> CaptionDecoder:
    """Build a registered decoder; unknown names, unknown settings or settings out of bounds are a UserError."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UserError(f"unknown decoder {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    known = getattr(cls, "config_keys", None)
    if known is not None:
        bad = sorted(set(cfg) - set(known))
        if bad:
            raise UserError(f"decoder {name!r}: unknown setting(s) {', '.join(bad)}; known: {', '.join(known)}")
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:
        cfg = check_settings(name, config_class, {"vocab_size": vocab_size, "feat_dim": feat_dim, **cfg})
        return cls(**cfg)
    return cls(vocab_size=int(vocab_size), feat_dim=int(feat_dim), **cfg)
