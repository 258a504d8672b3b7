"""A whole captioning model: raw image -> encoder -> decoder -> words.

This is what evaluation times and what an artifact loads into, so encoder
changes and compression count in every number the table reports.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .compress import artifact
from .data.images import load_tensor


class Captioner:
    def __init__(self, encoder, decoder, itow: dict[int, str], max_len: int = 16, device: str = "cpu"):
        self.encoder = encoder.eval().to(device)
        self.decoder = decoder.eval().to(device)
        self.itow = itow
        self.max_len = max_len
        self.device = device

    def parameters(self):
        yield from self.encoder.parameters()
        yield from self.decoder.parameters()

    def state_groups(self) -> dict[str, dict[str, torch.Tensor]]:
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


def pack_model(out, encoder, decoder, itow: dict[int, str], max_len: int = 16,
               extra: dict | None = None, encode_as=None) -> int:
    """Write encoder + decoder + vocabulary as one artifact; returns its size in bytes."""
    config = {"encoder": encoder.config(), "decoder": decoder.config,
              "vocab": {str(k): v for k, v in itow.items()}, "max_len": max_len,
              "runtime": {}, **(extra or {})}
    groups = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}
    return artifact.pack(out, groups, config, encode_as)


def load_captioner(path: str | Path, device: str = "cpu") -> Captioner:
    """Rebuild a Captioner from an artifact alone: no dataset, config or network needed."""
    from .encoders import create_encoder
    from .models import create_decoder

    config, groups = artifact.read(path)
    ec = config["encoder"]
    encoder = create_encoder(ec["timm_name"], img_size=ec["img_size"], mean=ec["mean"], std=ec["std"])
    encoder.load_state_dict(groups["encoder"])
    decoder = create_decoder(**config["decoder"])
    decoder.load_state_dict(groups["decoder"])
    itow = {int(k): v for k, v in config["vocab"].items()}
    cap = Captioner(encoder, decoder, itow, config.get("max_len", 16), device)
    cap.config = config
    return cap
