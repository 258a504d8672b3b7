"""Small run-time helpers shared by every stage: seeding, device choice, threads."""
from __future__ import annotations

import os
import random


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so the same config gives the same table."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(requested: str = "auto") -> str:
    """'auto' means CUDA when present, else CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(int(n))


def offline_hub() -> None:
    """No hub downloads unless the user opts in (CAPTIONING_ALLOW_HUB=1): fail in 0.1 s, not 47 s."""
    if os.environ.get("CAPTIONING_ALLOW_HUB") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def caption_in_batches(captioner, paths, beam_size: int, batch_size: int) -> list[str]:
    """Image files to captions, ``batch_size`` files at a time: what both runtimes' ``caption_files`` do."""
    out = []
    for i in range(0, len(paths), batch_size):
        out += captioner.caption_images(captioner.images(paths[i:i + batch_size]), beam_size)
    return out
