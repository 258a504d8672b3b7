"""Image encoders: any timm model, used as a grid-of-regions feature extractor.

The captioning decoders read two things per image, as in Up-Down:
``att`` [B, H*W, C], the last feature map flattened into regions, and
``fc`` [B, C], its mean, a global summary. ``forward_features`` gives the
map for every timm CNN, so any timm name works without per-model code.
``make_encoder`` and ``extract_dataset`` (module ``make``) are the workflow's two encoder stages.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.images import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from ..io import load_tensors, save_tensors
from ..utils import offline_hub

offline_hub()  # before timm touches the hub: fail fast offline instead of retrying for ~47 s
import timm  # noqa: E402 (at import, not inside a timed model step: it costs seconds)

FILE_KIND = "captioning.encoder"
MAX_IMG_SIZE = 2048  # pixels a side: past it one image's activations alone outgrow a phone


class FeatureEncoder(nn.Module):
    """A timm backbone without its classifier; returns (fc, att) region features."""

    def __init__(self, timm_name: str, img_size: int, mean, std):
        super().__init__()
        cfg = timm.get_pretrained_cfg(timm_name)
        # ViT-style models fix the input size through their position embeddings; CNNs take any size
        self.fixed_input_size = bool(cfg is not None and cfg.fixed_input_size)
        kwargs = {"img_size": img_size} if self.fixed_input_size else {}
        self.model = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
        self.timm_name = timm_name
        self.img_size = int(img_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.feat_dim = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.model.forward_features(images)
        if x.ndim == 4:  # CNN map [B, C, H, W] -> regions [B, H*W, C]
            att = x.flatten(2).transpose(1, 2)
        else:  # transformer tokens [B, N, C]: the class/register tokens are not regions
            att = x[:, self.num_prefix_tokens:]
        return att.mean(1), att

    def config(self) -> dict:
        """Everything ``create_encoder`` needs to rebuild this encoder (weights aside)."""
        return {"timm_name": self.timm_name, "img_size": self.img_size,
                "mean": list(self.mean), "std": list(self.std)}


def create_encoder(timm_name: str, img_size: int = 128, mean=None, std=None, seed: int = 0) -> FeatureEncoder:
    """A randomly initialised encoder; ``mean``/``std`` default to the model's own preprocessing.

    The random init is drawn from ``seed`` (global RNG untouched), so an untrained encoder is reproducible.
    """
    import timm

    if not isinstance(timm_name, str) or not timm.is_model(timm_name):
        raise UserError(f"unknown encoder '{timm_name}' (not a timm model)")
    if not isinstance(img_size, int) or isinstance(img_size, bool) or not 8 <= img_size <= MAX_IMG_SIZE:
        raise UserError(f"encoder img_size must be an integer in [8, {MAX_IMG_SIZE}], got {img_size!r}")
    cfg = timm.get_pretrained_cfg(timm_name)
    cfg = cfg.to_dict() if cfg is not None else {}
    mean = tuple(mean) if mean is not None else tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(std) if std is not None else tuple(cfg.get("std") or IMAGENET_STD)
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            raise UserError(f"encoder {name} must be 3 numbers (one per RGB channel), got {list(v)}")
    if any(s <= 0 for s in std):
        raise UserError(f"encoder std must be positive, got {list(std)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FeatureEncoder(timm_name, img_size, mean, std)


def save_encoder(encoder: FeatureEncoder, path: str | Path) -> None:
    """One safetensors file: the timm state dict, with ``config()`` in the metadata.

    Keys are timm's own, so the file also works as ``init_weights`` source for a fresh encoder.
    """
    save_tensors(path, encoder.model.state_dict(), {"kind": FILE_KIND, "config": encoder.config()})


def load_encoder(path: str | Path) -> FeatureEncoder:
    """Rebuild an encoder saved by ``save_encoder``, in eval mode on CPU."""
    from .weights import load_into

    tensors, meta = load_tensors(path)
    cfg = meta.get("config")
    if meta.get("kind") != FILE_KIND or not isinstance(cfg, dict):
        raise UserError(f"{path}: not an encoder file (no encoder config in its metadata)")
    try:
        encoder = create_encoder(cfg["timm_name"], cfg["img_size"], cfg["mean"], cfg["std"])
    except KeyError as e:
        raise UserError(f"{path}: encoder config lacks key {e}") from None
    load_into(encoder.model, tensors, str(path))
    return encoder.eval()


from .make import extract_dataset, make_encoder  # noqa: E402 (they build on the above)

__all__ = ["FeatureEncoder", "create_encoder", "save_encoder", "load_encoder", "make_encoder", "extract_dataset",
           "IMAGENET_MEAN", "IMAGENET_STD"]
