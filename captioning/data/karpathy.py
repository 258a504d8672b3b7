"""Read any dataset in Karpathy's split format: COCO, Flickr8k, Flickr30k, or our synthetic one.

The format is one JSON file: {"dataset": name, "images": [{"filepath"?, "filename", "imgid", "cocoid"?,
"split", "sentences": [{"tokens", "raw", ...}], ...}]}. Flickr entries have no "filepath" and no "cocoid".
Everything is checked up front, so a broken file fails here with the image index and field named,
not deep inside training with a KeyError.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import UserError
from ..io import read_json

SPLITS = ("train", "restval", "val", "test")


def image_id(img: dict) -> int:
    """The id evaluation uses: COCO's cocoid when there is one, else Karpathy's imgid."""
    return int(img["cocoid"]) if "cocoid" in img else int(img["imgid"])


def image_path(img: dict, image_root) -> Path:
    """image_root/filepath/filename; Flickr entries have no filepath, so image_root/filename."""
    return Path(image_root) / img.get("filepath", "") / img["filename"]


def load_karpathy(path) -> dict:
    """Load and validate a Karpathy-format dataset; drop captions with no tokens (with one warning)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: no 'images' list (expected Karpathy's dataset_*.json format)")
    if not data["images"]:
        raise UserError(f"{path}: 'images' is empty")

    dropped, seen = 0, {}
    for i, img in enumerate(data["images"]):
        where = f"{path}: image {i}"
        if not isinstance(img, dict):
            raise UserError(f"{where} is not an object")
        for key in ("split", "filename", "sentences"):
            if key not in img:
                raise UserError(f"{where} has no '{key}'")
        if "cocoid" not in img and "imgid" not in img:
            raise UserError(f"{where} has no 'imgid' (nor 'cocoid')")
        for key in ("cocoid", "imgid"):
            if key in img and not _is_int(img[key]):
                raise UserError(f"{where}: '{key}' must be an integer, got {img[key]!r}")
        if img["split"] not in SPLITS:
            raise UserError(f"{where}: 'split' is {img['split']!r}, expected one of {', '.join(SPLITS)}")
        for key in ("filename", "filepath"):
            if key in img and not (isinstance(img[key], str) and (img[key] or key == "filepath")):
                raise UserError(f"{where}: '{key}' must be a non-empty string")
        if not isinstance(img["sentences"], list):
            raise UserError(f"{where}: 'sentences' must be a list")
        kept = []
        for j, sent in enumerate(img["sentences"]):
            if not isinstance(sent, dict) or "tokens" not in sent:
                raise UserError(f"{where} sentence {j} has no 'tokens'")
            toks = sent["tokens"]
            if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
                raise UserError(f"{where} sentence {j}: 'tokens' must be a list of strings")
            if "raw" in sent and not isinstance(sent["raw"], str):
                raise UserError(f"{where} sentence {j}: 'raw' must be a string")
            sent["tokens"] = [t for t in toks if t.strip()]
            if sent["tokens"]:
                kept.append(sent)
            else:
                dropped += 1
        if not kept:
            raise UserError(f"{where} has no non-empty caption in 'sentences'")
        img["sentences"] = kept
        iid = image_id(img)
        if iid in seen:
            raise UserError(f"{where} has the same id {iid} as image {seen[iid]}")
        seen[iid] = i

    if dropped:
        warnings.warn(f"{path}: dropped {dropped} empty caption(s)", stacklevel=2)
    data.setdefault("dataset", path.stem.removeprefix("dataset_"))
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
