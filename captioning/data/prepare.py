"""Turn a Karpathy-format dataset into what training and evaluation read: a vocabulary, label arrays, refs.

Outputs in ``out_dir`` (all written atomically):
  vocab.json       {"itow": {"1": word, ...}, "word_count_threshold", "max_length"}; index 0 is end/pad.
  labels.h5        labels int32 [n_captions, max_length] (0-padded, truncated), label_start_ix and
                   label_end_ix int64 [n_images] (0-based, end exclusive), label_length int32 [n_captions].
  images.json      [{"id", "file_path" (relative to image_root), "split"}], the row order of labels.h5.
  info.json        {"image_root" (absolute), "dataset", "n_images": {split: n}, "vocab_size"}.
  refs_val.json, refs_test.json   the raw reference captions in COCO's caption annotation format.

The vocabulary is built from train captions only (COCO's "restval" counts as train), so val/test
words never leak into it. Words seen ``word_count_threshold`` times or fewer become "UNK", which is in
the vocabulary only if some caption needs it. Words are ordered by count (most frequent first), then
alphabetically, so the same dataset always gives the same indices.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import atomic_path, read_json, write_json
from .karpathy import image_id, image_path, load_karpathy

UNK = "UNK"


def _split(img: dict) -> str:
    return "train" if img["split"] == "restval" else img["split"]


def _file_path(img: dict) -> str:
    return f"{img['filepath']}/{img['filename']}" if img.get("filepath") else img["filename"]


def build_vocab(images: list[dict], word_count_threshold: int) -> list[str]:
    """Words 1..V: train words seen more than the threshold, plus UNK if any caption has another word."""
    counts = Counter(t for img in images if _split(img) == "train" for s in img["sentences"] for t in s["tokens"])
    words = sorted((w for w, n in counts.items() if n > word_count_threshold), key=lambda w: (-counts[w], w))
    known = set(words)
    if any(t not in known for img in images for s in img["sentences"] for t in s["tokens"]):
        words.append(UNK)
    return words


def _refs(images: list[dict], split: str) -> dict:
    """COCO caption annotations for one split; annotation ids are unique within the file."""
    imgs, anns = [], []
    for img in images:
        if _split(img) != split:
            continue
        iid = image_id(img)
        imgs.append({"id": iid, "file_name": img["filename"]})
        for s in img["sentences"]:
            raw = s.get("raw", "").strip() or " ".join(s["tokens"])
            anns.append({"image_id": iid, "id": len(anns), "caption": raw})
    return {"info": {}, "licenses": [], "type": "captions", "images": imgs, "annotations": anns}


def prepare(dataset_json, image_root, out_dir, word_count_threshold: int = 5, max_length: int = 16) -> None:
    """Write vocab.json, labels.h5, images.json, info.json and refs_{val,test}.json into ``out_dir``."""
    import h5py

    if not isinstance(word_count_threshold, int) or word_count_threshold < 0:
        raise UserError(f"word_count_threshold must be an integer >= 0, got {word_count_threshold!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"max_length must be an integer >= 1, got {max_length!r}")
    dataset_json, image_root, out_dir = Path(dataset_json), Path(image_root).resolve(), Path(out_dir)
    data = load_karpathy(dataset_json)
    images = data["images"]

    if not image_root.is_dir():
        raise UserError(f"{image_root}: image root is not a directory")
    missing = [p for p in (image_path(img, image_root) for img in images) if not p.is_file()]
    if missing:
        raise UserError(f"{image_root}: {len(missing)} of {len(images)} images in {dataset_json} are missing, "
                        f"e.g. {missing[0]}")
    if not any(_split(img) == "train" for img in images):
        raise UserError(f"{dataset_json}: no image has split 'train' (or 'restval'), so there is no vocabulary")

    itow = build_vocab(images, word_count_threshold)
    wtoi = {w: i + 1 for i, w in enumerate(itow)}
    unk = wtoi.get(UNK, 0)

    n_caps = sum(len(img["sentences"]) for img in images)
    labels = np.zeros((n_caps, max_length), dtype=np.int32)
    lengths = np.zeros(n_caps, dtype=np.int32)
    start = np.zeros(len(images), dtype=np.int64)
    end = np.zeros(len(images), dtype=np.int64)
    k = 0
    for i, img in enumerate(images):
        start[i] = k
        for s in img["sentences"]:
            toks = s["tokens"][:max_length]
            labels[k, :len(toks)] = [wtoi.get(t, unk) for t in toks]
            lengths[k] = len(toks)
            k += 1
        end[i] = k

    with atomic_path(out_dir / "labels.h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("labels", data=labels)
            f.create_dataset("label_start_ix", data=start)
            f.create_dataset("label_end_ix", data=end)
            f.create_dataset("label_length", data=lengths)
    write_json(out_dir / "images.json",
               [{"id": image_id(img), "file_path": _file_path(img), "split": _split(img)} for img in images],
               indent=None)
    write_json(out_dir / "vocab.json", {"itow": {str(i + 1): w for i, w in enumerate(itow)},
                                        "word_count_threshold": word_count_threshold, "max_length": max_length})
    for split in ("val", "test"):
        write_json(out_dir / f"refs_{split}.json", _refs(images, split), indent=None)
    n_images = {s: sum(_split(img) == s for img in images) for s in ("train", "val", "test")}
    write_json(out_dir / "info.json", {"image_root": str(image_root), "dataset": str(data["dataset"]),
                                       "n_images": n_images, "vocab_size": len(itow)})


def load_vocab(prepared_dir) -> dict[int, str]:
    """index -> word from a prepared directory's vocab.json (index 0, the end token, is not in it)."""
    path = Path(prepared_dir) / "vocab.json"
    vocab = read_json(path)
    itow = vocab.get("itow") if isinstance(vocab, dict) else None
    if not isinstance(itow, dict) or not itow:
        raise UserError(f"{path}: no 'itow' word table")
    try:
        return {int(i): str(w) for i, w in itow.items()}
    except ValueError:
        raise UserError(f"{path}: 'itow' keys must be integers") from None


def split_images(prepared, split: str = "test") -> tuple[list[dict], list[Path]]:
    """The prepared images of one split, and their files."""
    prepared = Path(prepared)
    info = read_json(prepared / "info.json")
    images = [im for im in read_json(prepared / "images.json") if im["split"] == split]
    return images, [Path(info["image_root"]) / im["file_path"] for im in images]


def decode(itow: dict[int, str], seq) -> str:
    """Word indices -> a caption string, stopping at the first 0 (end token)."""
    words = []
    for ix in seq:
        ix = int(ix)
        if ix == 0:
            break
        if ix not in itow:
            raise UserError(f"word index {ix} is not in the vocabulary ({len(itow)} words): wrong vocab.json?")
        words.append(itow[ix])
    return " ".join(words)
