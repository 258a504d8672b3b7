"""Encoder features + prepared captions, served as shuffled batches per split.

Inputs (written by earlier stages):

- ``features.h5``: "ids" int64 [N], "fc" float16 [N, C], "att" float16 [N, HW, C], in images.json order;
- the prepared-captions dir: ``images.json`` [{"id", "file_path", "split"}], ``labels.h5``
  ("labels" int32 [n_caps, L] 0-padded; "label_start_ix"/"label_end_ix" int64 [N], 0-based,
  end-exclusive), ``vocab.json`` {"itow": {"1": word, ...}, "max_length"}, ``refs_{val,test}.json`` (COCO format).

Captions, ids and splits are small and held in memory. Features are served by a store
(``features``): read whole into memory for small datasets, or streamed from the file batch by
batch, in worker processes, when they would not fit (COCO's 7x7x2048 grids are about 25 GB).
Either way they become float32 one batch at a time, and a batch is the same in both modes: all
randomness (shuffling, caption choice) is drawn here, in the main process, in the same order.

As in the reference loader, each image contributes ``seq_per_img`` captions to a batch (a random
contiguous window of its captions, or a draw with replacement when it has fewer), and
Karpathy's "restval" images count as training images. ``to_device`` moves a batch to the
training device, through pinned memory on request.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from ..io import read_json
from .features import H5Features, MemoryFeatures, open_h5, open_features

TRAIN_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


@dataclass
class Batch:
    ids: list[int]           # image ids, B
    fc: torch.Tensor         # [B, C] float32
    att: torch.Tensor        # [B, HW, C] float32
    labels: torch.Tensor     # [B * seq_per_img, L] long, 0-padded; rows i*k .. i*k+k-1 are image i's


def to_device(x: Batch | torch.Tensor, device: str | torch.device, pin_memory: bool = False):
    """A tensor, or a ``Batch`` with its tensors, on ``device``: the one place batches cross to it.

    ``pin_memory`` matters only for a CUDA device: each host tensor is first copied into
    page-locked memory, from which the copy to the GPU runs asynchronously (``non_blocking``)
    while the host prepares the next step. On any other device it is a no-op (a CPU tensor
    stays the very same tensor): there is no transfer to speed up, and pinning needs CUDA.
    """
    if isinstance(x, Batch):
        return replace(x, fc=to_device(x.fc, device, pin_memory), att=to_device(x.att, device, pin_memory),
                       labels=to_device(x.labels, device, pin_memory))
    if pin_memory and torch.device(device).type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def read_h5(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named datasets of a small HDF5 file, whole (the labels); a ``UserError`` for a bad file."""
    with open_h5(path) as f:
        missing = [k for k in keys if k not in f]
        if missing:
            raise UserError(f"{path}: missing dataset(s) {', '.join(missing)}")
        try:
            return {k: f[k][()] for k in keys}
        except OSError as e:
            raise UserError(f"{path}: not a readable HDF5 file ({e})") from None


class CaptionData:
    """One dataset's features and captions; ``batches(split, ...)`` yields ``Batch``es.

    ``features``: "memory", "stream" or "auto" (stream a file larger than ``memory_limit_mb`` MiB);
    see ``features.open_features``. ``workers``: reader processes when streaming (0: read in this one).
    """

    def __init__(self, features_h5: str | Path, prepared_dir: str | Path, seq_per_img: int = 5,
                 features: str = "memory", memory_limit_mb: float = 4000, workers: int = 0):
        features_h5, prepared_dir = Path(features_h5), Path(prepared_dir)
        self.seq_per_img, self.workers = int(seq_per_img), max(int(workers), 0)

        images = read_json(prepared_dir / "images.json")
        vocab = read_json(prepared_dir / "vocab.json")
        try:
            self.ids = np.array([int(im["id"]) for im in images], dtype=np.int64)
            self.splits = np.array([str(im["split"]) for im in images])
            self.itow = {int(k): str(w) for k, w in vocab["itow"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{prepared_dir}: malformed images.json or vocab.json ({e!r})") from None
        self.vocab_size = max(self.itow, default=0)

        self.features: MemoryFeatures | H5Features = open_features(features_h5, features, memory_limit_mb,
                                                                   self.workers)
        if not np.array_equal(self.features.ids, self.ids):
            raise UserError(f"{features_h5}: image ids differ from {prepared_dir / 'images.json'} "
                            "(features must be extracted from the same prepared dataset, same order)")
        self.feat_dim = self.features.feat_dim

        lab_path = prepared_dir / "labels.h5"
        lab = read_h5(lab_path, ("labels", "label_start_ix", "label_end_ix"))
        self.labels = torch.from_numpy(lab["labels"].astype(np.int64))
        self.start, self.end = lab["label_start_ix"].astype(np.int64), lab["label_end_ix"].astype(np.int64)
        if len(self.start) != len(self.ids) or len(self.end) != len(self.ids):
            raise UserError(f"{lab_path}: {len(self.start)} label ranges for {len(self.ids)} images in images.json")
        if (self.end < self.start).any() or (self.end > len(self.labels)).any() or (self.start < 0).any():
            raise UserError(f"{lab_path}: label_start_ix/label_end_ix out of range")
        if self.labels.numel() and int(self.labels.max()) > self.vocab_size:
            raise UserError(f"{lab_path}: word index {int(self.labels.max())} not in vocab.json")
        # captions were truncated to this many words when prepared: decode no longer than that
        self.max_length = int(vocab.get("max_length") or self.labels.shape[1])

    @property
    def fc(self) -> torch.Tensor:
        """All pooled features [N, C], float16: in-memory store only (a streaming one reads by rows)."""
        return self.features.fc

    @property
    def att(self) -> torch.Tensor:
        """All grid features [N, HW, C], float16: in-memory store only."""
        return self.features.att

    def itow_json(self) -> dict[str, str]:
        """The vocabulary as checkpoints record it (JSON keys are strings)."""
        return {str(k): w for k, w in sorted(self.itow.items())}

    def fingerprint(self) -> str:
        """A short hash of ids, fc features and captions: tells a resume file made from other data.

        fc is hashed a block at a time (the same bytes in the same order, so the same hash as one
        whole array), which works for a streaming store too. The store itself is not hashed: a
        resumed run may read its features another way.
        """
        import hashlib

        h = hashlib.sha1(np.ascontiguousarray(self.ids).tobytes())
        for block in self.features.fc_blocks():
            h.update(np.ascontiguousarray(block).tobytes())
        for a in (self.labels.numpy(), self.start, self.end):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def index(self, split: str) -> np.ndarray:
        """Row numbers of a split, in file order."""
        if split not in TRAIN_SPLITS:
            raise UserError(f"unknown split {split!r}; known: {', '.join(TRAIN_SPLITS)}")
        return np.flatnonzero(np.isin(self.splits, TRAIN_SPLITS[split]))

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None, with_labels: bool = True) -> Iterator[Batch]:
        """One pass over a split. Shuffling and caption choice draw only from ``generator``, here, in
        batch order; the feature store only reads the rows it is given (maybe ahead, in workers)."""
        rows = self.index(split)
        if shuffle:
            rows = rows[torch.randperm(len(rows), generator=generator).numpy()]
        row_batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        for r, (fc, att) in zip(row_batches, self.features.reads(row_batches, self.workers)):
            labels = self._pick_captions(r, generator) if with_labels else torch.zeros(0, 0, dtype=torch.long)
            yield Batch(ids=self.ids[r].tolist(), fc=fc, att=att, labels=labels)

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-len(self.index(split)) // batch_size)

    def _pick_captions(self, rows: np.ndarray, generator: torch.Generator | None) -> torch.Tensor:
        k, out = self.seq_per_img, []
        for r in rows:
            a, b = int(self.start[r]), int(self.end[r])
            n = b - a
            if n <= 0:
                raise UserError(f"image {int(self.ids[r])} has no captions in labels.h5")
            if n >= k:
                first = a + int(torch.randint(n - k + 1, (1,), generator=generator))
                out.append(self.labels[first:first + k])
            else:
                out.append(self.labels[a + torch.randint(n, (k,), generator=generator)])
        return torch.cat(out, 0)

    def decode(self, seq: torch.Tensor) -> list[str]:
        """Token rows -> captions: words up to the first 0."""
        caps = []
        for row in seq.tolist():
            words = []
            for w in row:
                if w == 0:
                    break
                words.append(self.itow.get(w, "UNK"))
            caps.append(" ".join(words))
        return caps
