"""Validation during training: caption the val split, score it with CIDEr-D.

The score picks the kept epoch, so it must be cheap and Java-free: captions and references
are lowercased with punctuation removed (``simple_tokenize``) instead of going through the PTB
tokenizer, and CIDEr-D is the vectorised ``evaluation.cider`` scorer, equal to pycocoevalcap's.
The references come through ``evaluation.refs``, the reader the final evaluation uses.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import UserError
from ..evaluation.cider import corpus_cider_d
from ..evaluation.refs import load_refs
from ..models import CaptionDecoder
from ..models.search import beam_search, greedy
from .loader import CaptionData, to_device

_PUNCT = re.compile(r"[^\w\s]")


def simple_tokenize(text: str) -> str:
    """Lowercase, delete punctuation, normalise spaces: a Java-free stand-in for the PTB tokenizer."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def cider_d(captions: list[dict], refs: dict[int, list[str]], refs_name: str = "references") -> float:
    """Corpus CIDEr-D of [{"image_id", "caption"}]; document frequencies from the captioned images' references."""
    if not captions:
        return 0.0
    missing = [c["image_id"] for c in captions if c["image_id"] not in refs]
    if missing:
        raise UserError(f"{refs_name}: no reference captions for image id {missing[0]} "
                        f"({len(missing)} of {len(captions)} missing)")
    res = {c["image_id"]: simple_tokenize(c["caption"]) for c in captions}
    gts = {i: [simple_tokenize(r) for r in refs[i]] for i in res}
    return corpus_cider_d(gts, res)[0]


@torch.no_grad()
def generate_captions(decoder: CaptionDecoder, data: CaptionData, split: str, beam_size: int = 1,
                      max_length: int | None = None, batch_size: int = 50, device: str = "cpu",
                      progress: bool = True, pin_memory: bool = False) -> list[dict]:
    """Caption every image of a split: [{"image_id", "caption"}] in file order.

    ``max_length`` defaults to the prepared data's, the length its captions were truncated to.
    """
    max_length = max_length or data.max_length
    was_training = decoder.training
    decoder.eval()
    out = []
    batches = data.batches(split, batch_size, with_labels=False)
    for b in tqdm(batches, total=data.num_batches(split, batch_size), desc=f"decode {split}",
                  file=sys.stderr, disable=not progress, leave=False):
        b = to_device(b, device, pin_memory)
        if beam_size <= 1:
            seq = greedy(decoder, b.fc, b.att, max_length)
        else:
            seq = beam_search(decoder, b.fc, b.att, beam_size, max_length)
        out += [{"image_id": i, "caption": c} for i, c in zip(b.ids, data.decode(seq.cpu()))]
    decoder.train(was_training)
    return out


class Validator:
    """``score(decoder)``: val CIDEr-D of the decoder's captions at a fixed beam and length."""

    def __init__(self, data: CaptionData, prepared_dir, beam_size: int, max_length: int, batch_size: int,
                 device: str, pin_memory: bool, progress: bool):
        self.refs_path = Path(prepared_dir) / "refs_val.json"
        try:
            self.refs = {int(i): caps for i, caps in load_refs(self.refs_path)[1].items()}
        except (TypeError, ValueError):
            raise UserError(f"{self.refs_path}: image ids must be integers, as the prepared images' are") from None
        self.data, self.beam_size, self.max_length, self.batch_size = data, beam_size, max_length, batch_size
        self.device, self.pin_memory, self.progress = device, pin_memory, progress

    def score(self, decoder: CaptionDecoder) -> float:
        caps = generate_captions(decoder, self.data, "val", self.beam_size, self.max_length, self.batch_size,
                                 self.device, self.progress, self.pin_memory)
        return cider_d(caps, self.refs, str(self.refs_path))
