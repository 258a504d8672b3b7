"""Reading COCO-format caption files: references (annotations) and results.

One reader for every stage that scores captions, so training validation and the final
evaluation agree on what a reference file holds and reject the same malformed ones.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import UserError
from ..io import read_json


def load_refs(refs: str | os.PathLike | dict) -> tuple[list, dict[Any, list[str]]]:
    """-> (image ids in reference order, {image_id: [caption, ...]})."""
    src = str(refs) if isinstance(refs, (str, os.PathLike)) else "references"
    data = read_json(refs) if isinstance(refs, (str, os.PathLike)) else refs
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"{src}: not a COCO caption annotation file (needs an 'annotations' list)")
    captions: dict[Any, list[str]] = {}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise UserError(f"{src}: annotations[{k}] needs an 'image_id' and a string 'caption'")
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    images = data.get("images")
    if images is None:
        return list(captions), captions
    if not isinstance(images, list) or not all(isinstance(im, dict) and "id" in im for im in images):
        raise UserError(f"{src}: 'images' must be a list of objects with an 'id'")
    return list(dict.fromkeys(im["id"] for im in images)), captions


def load_results(results: str | os.PathLike | list) -> tuple[str, dict[Any, str]]:
    """-> (name for messages, {image_id: caption}); one caption per image, as COCO requires."""
    src = str(results) if isinstance(results, (str, os.PathLike)) else "results"
    data = read_json(results) if isinstance(results, (str, os.PathLike)) else results
    if not isinstance(data, list) or not data:
        raise UserError(f"{src}: expected a non-empty list of {{'image_id', 'caption'}} entries")
    out: dict[Any, str] = {}
    for k, r in enumerate(data):
        if not isinstance(r, dict) or not isinstance(r.get("image_id"), (int, str)) \
                or not isinstance(r.get("caption"), str):
            raise UserError(f"{src}: entry {k} needs an integer 'image_id' and a string 'caption'")
        if r["image_id"] in out:
            raise UserError(f"{src}: image_id {r['image_id']!r} has more than one caption")
        out[r["image_id"]] = r["caption"]
    return src, out
