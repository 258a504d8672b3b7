"""Load any common image as an RGB tensor, with one clear error for a missing or broken file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(path: str | Path, size: int | None = None) -> Image.Image:
    """Open an image in any mode (grayscale, CMYK, palette, alpha) and return it as RGB.

    Alpha is composited onto white, so a transparent PNG looks as it does in a viewer. With ``size``
    (the side it will be resized to), a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale
    that still covers ``size``×``size``: a 640×480 photo for a 128 px encoder decodes in about half
    the time, which is a large share of a small model's latency. Training, features and captioning
    all load this way, so they see the same pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            if size:
                im.draft(None, (size, size))
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, im).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def to_tensor(im: Image.Image, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Resize to ``size``×``size`` (bilinear) and normalise: a float tensor [3, size, size]."""
    im = im.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def load_tensor(path: str | Path, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return to_tensor(load_rgb(path, size), size, mean, std)


def encoder_images(encoder, paths) -> torch.Tensor:
    """Image files as ``encoder`` takes them: [N, 3, S, S] at its size, with its normalisation."""
    return torch.stack([load_tensor(p, encoder.img_size, encoder.mean, encoder.std) for p in paths])
