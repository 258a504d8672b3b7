"""Evaluate one model variant from its artifact on the raw test images.

Writes the captions (COCO results JSON) and one metrics JSON holding quality,
size on disk, parameter counts and latency, which the table step collects.
"""
from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from ..data.prepare import split_images
from ..io import write_json


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


def evaluate(model, prepared, out_dir, split="test", beam_size=3, batch_size=16,
             latency_images=20, threads=1, spice="auto", device="cpu", meta=None) -> dict:
    """Caption, score and size one artifact; ``latency_images`` 0 leaves latency to ``measure_artifacts``.

    ``threads`` is the CPU thread count of the latency timing only (recorded as ``threads``): the
    captioning that is scored runs with torch's current thread count, so scores do not depend on it.
    ``device``: where the captioning runs ("auto": CUDA when present); latency is timed on CPU.
    """
    from ..captioner import load_captioner
    from .metrics import meteor_scorer, score_captions

    prepared, out_dir = Path(prepared), Path(out_dir)
    images, paths = split_images(prepared, split)

    cap = load_captioner(model, device=device)
    with meteor_scorer() as meteor:  # its java starts loading now, beside the captioning
        results = []
        for i in tqdm(range(0, len(paths), batch_size), desc=f"caption {split}", unit="batch"):
            caps = cap.caption_files(paths[i:i + batch_size], beam_size, batch_size)
            results += [{"image_id": im["id"], "caption": c}
                        for im, c in zip(images[i:i + batch_size], caps)]
        write_json(out_dir / "captions.json", results)
        scores = score_captions(prepared / f"refs_{split}.json", results, spice=spice, meteor=meteor, per_image=True)
    params, nonzero = count_params(cap)
    latency = None
    if latency_images > 0:
        from .latency import measure_latency

        cap.encoder.cpu(), cap.decoder.cpu()
        cap.device = "cpu"
        latency = measure_latency(cap, paths[:latency_images], beam_size, threads)
    storage = cap.config.get("storage", {})
    floor = storage.get("floor_bytes")
    per_image = scores.pop("CIDEr_per_image")
    metrics = {**(meta or {}), **scores, "params": params, "nonzero_params": nonzero,
               "sparsity": storage.get("sparsity"), "sparsity_all": storage.get("sparsity_all"),
               "size_bytes": os.path.getsize(model), "size_mb": os.path.getsize(model) / 1e6,
               "floor_mb": floor / 1e6 if floor is not None else None,
               "latency_ms": latency, "beam_size": beam_size, "threads": threads,
               "n_images": len(results),
               # for intervals: the table resamples images, pairing each row with its reference
               "cider_per_image": {str(i): c for i, c in per_image.items()}}
    write_json(out_dir / "metrics.json", metrics)
    return metrics
