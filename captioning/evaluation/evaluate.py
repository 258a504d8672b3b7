"""Evaluate model variants from their artifacts on the raw test images, in two steps.

1. ``caption_artifact`` (one job per variant): the artifact captions the test images
   (``captions.json``, COCO results) and its size and parameters go to ``variant.json``.
2. ``score_variants`` (one job for them all): the COCO metrics of every variant's captions, with
   one tokenizer and one METEOR process for the batch, written as one ``metrics.json`` per
   variant, which the table step collects. Scores are cached by the hash of what they depend on,
   so a rerun after one variant changed scores that variant alone.

``evaluate`` does both for one artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path

from tqdm import tqdm

from ..data.prepare import split_images
from ..errors import UserError
from ..io import read_json, write_json
from ..timing import model_work

# Bump when a change to the scoring would change a cached score.
SCORING_VERSION = 1


def count_params(captioner) -> tuple[int, int]:
    """(all parameters, nonzero parameters) of encoder + decoder, as stored in the artifact."""
    total = nonzero = 0
    for group in captioner.state_groups().values():
        for name, t in group.items():
            if not t.is_floating_point() or name.endswith(("running_mean", "running_var")):
                continue
            total += t.numel()
            nonzero += int((t != 0).sum())
    return total, nonzero


@model_work
def _caption_split(cap, images, paths, split: str, beam_size: int, batch_size: int, encoder_cache=None) -> list[dict]:
    """COCO results for ``split``; a torch model's encoder outputs come through ``encoder_cache``."""
    from .encoded import encoded_batches

    results = []
    steps = range(0, len(paths), batch_size)
    if encoder_cache is not None and cap.runtime == "torch":
        captions = (cap.caption_features(fc, att, beam_size)
                    for fc, att in encoded_batches(cap, paths, batch_size, encoder_cache))
    else:
        captions = (cap.caption_files(paths[i:i + batch_size], beam_size, batch_size) for i in steps)
    for i, caps in enumerate(tqdm(captions, total=len(steps), desc=f"caption {split}", unit="batch")):
        results += [{"image_id": im["id"], "caption": c} for im, c in zip(images[steps[i]:steps[i] + batch_size], caps)]
    return results


def caption_artifact(model, prepared, out_dir, split="test", beam_size=3, batch_size=16, latency_images=0,
                     threads=1, device="cpu", meta=None, encoder_cache=None) -> dict:
    """Caption ``split`` with the artifact ``model``: ``out_dir``/captions.json and variant.json.

    variant.json holds what the variant is (``meta``) and what it weighs: parameters, sparsity and
    size on disk. ``latency_images`` > 0 also times it (``threads`` CPU threads, on CPU); the
    workflow leaves latency to ``measure_artifacts``. ``encoder_cache``: a folder where variants
    with identical encoders share its outputs (``encoded``); the captions are the same either way.
    """
    from ..captioner import load_captioner

    prepared, out_dir = Path(prepared), Path(out_dir)
    images, paths = split_images(prepared, split)
    cap = load_captioner(model, device=device)
    results = _caption_split(cap, images, paths, split, beam_size, batch_size, encoder_cache)
    params, nonzero = count_params(cap)
    latency = None
    if latency_images > 0:
        from .latency import measure_latency

        latency = measure_latency(cap.cpu(), paths[:latency_images], beam_size, threads)
    storage = cap.config.get("storage", {})
    floor = storage.get("floor_bytes")
    facts = {**(meta or {}), "params": params, "nonzero_params": nonzero,
             "sparsity": storage.get("sparsity"), "sparsity_all": storage.get("sparsity_all"),
             "size_bytes": os.path.getsize(model), "size_mb": os.path.getsize(model) / 1e6,
             "floor_mb": floor / 1e6 if floor is not None else None,
             "latency_ms": latency, "beam_size": beam_size, "threads": threads, "n_images": len(results)}
    write_json(out_dir / "captions.json", results)
    write_json(out_dir / "variant.json", facts)
    return facts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _score_key(refs_hash: str, captions: Path, spice: bool) -> str:
    """What a variant's scores depend on: its captions, the references, SPICE on or off, the scorers."""
    parts = [refs_hash, _sha256(captions), f"spice={spice}", f"pycocoevalcap={version('pycocoevalcap')}",
             f"scoring={SCORING_VERSION}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _cached(path: Path) -> dict | None:
    """A cached score, or None when absent or not what ``score_many`` writes (then it is rescored)."""
    from .metrics import METRICS

    try:
        scores = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(scores, dict) and all(k in scores for k in METRICS) \
        and isinstance(scores.get("CIDEr_per_image"), dict)
    return scores if ok else None


def score_variants(refs, eval_dirs, cache_dir=None, spice="auto") -> list[dict]:
    """Write ``metrics.json`` (variant.json + scores + per-image CIDEr-D) in each of ``eval_dirs``.

    Each dir holds a variant's captions.json and variant.json. Scores whose inputs are unchanged come
    from ``cache_dir`` (one JSON per hash of refs, captions and scorer settings); the rest are
    scored together, so the JVMs start once per call, and only when something needs scoring.
    """
    from .metrics import score_many, spice_will_run

    refs, dirs = Path(refs), [Path(d) for d in eval_dirs]
    for d in dirs:
        for name in ("captions.json", "variant.json"):
            if not (d / name).is_file():
                raise UserError(f"{d / name}: file not found (caption the variant first)")
    spice_on = spice_will_run(spice)
    if not refs.is_file():
        raise UserError(f"{refs}: file not found")
    refs_hash = _sha256(refs)
    keys = [_score_key(refs_hash, d / "captions.json", spice_on) for d in dirs]
    cache = Path(cache_dir) if cache_dir else None
    found = {k: _cached(cache / f"{k}.json") for k in keys} if cache else {}
    # identical captions (an fp16 copy often writes its fp32 twin's) are scored once
    todo = list(dict.fromkeys(k for k in keys if found.get(k) is None))
    if todo:
        first = {k: dirs[keys.index(k)] for k in todo}
        fresh = score_many(refs, [first[k] / "captions.json" for k in todo], spice=spice_on, per_image=True)
        for k, s in zip(todo, fresh):
            s["CIDEr_per_image"] = {str(i): c for i, c in s["CIDEr_per_image"].items()}
            found[k] = s
            if cache:
                write_json(cache / f"{k}.json", s, indent=None)
    print(f"scored {len(todo)} distinct captions files for {len(dirs)} variants (the rest from the cache)")
    out = []
    for d, k in zip(dirs, keys):
        s = dict(found[k])
        # for intervals: the table resamples images, pairing each row with its reference
        per_image = s.pop("CIDEr_per_image")
        metrics = {**read_json(d / "variant.json"), **s, "cider_per_image": per_image}
        write_json(d / "metrics.json", metrics)
        out.append(metrics)
    return out


def evaluate(model, prepared, out_dir, split="test", beam_size=3, batch_size=16,
             latency_images=20, threads=1, spice="auto", device="cpu", meta=None) -> dict:
    """Caption, score and size one artifact: captions.json, variant.json and metrics.json in ``out_dir``.

    ``threads`` is the CPU thread count of the latency timing only (recorded as ``threads``): the
    captioning that is scored runs with torch's current thread count, so scores do not depend on it.
    ``device``: where the captioning runs ("auto": CUDA when present); latency is timed on CPU.
    """
    prepared = Path(prepared)
    caption_artifact(model, prepared, out_dir, split=split, beam_size=beam_size, batch_size=batch_size,
                     latency_images=latency_images, threads=threads, device=device, meta=meta)
    return score_variants(prepared / f"refs_{split}.json", [out_dir], spice=spice)[0]
