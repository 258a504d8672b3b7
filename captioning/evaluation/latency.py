"""CPU latency per image as a phone user would feel it: batch 1, raw image in, caption out.

``threads`` here is the CPU thread count of the timing alone: torch's thread count is set to it
while timing and restored afterwards, so whatever else the process computes is unaffected; an
ONNX Runtime artifact gets sessions of that many threads.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..captioner import load_captioner
from ..timing import model_work


def measure_latency(captioner, paths, beam_size: int = 3, threads: int = 1, warmup: int = 2) -> float:
    """Median milliseconds per image (encoder + decoder, batch 1, ``threads`` CPU threads).

    Image decoding from disk is excluded: it is the same for every variant.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        images = [captioner.images([p]) for p in paths]
        for x in images[:warmup]:
            captioner.caption_images(x, beam_size)
        times = []
        for x in images:
            t0 = time.perf_counter()
            captioner.caption_images(x, beam_size)
            times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(prev)
    return statistics.median(times)


@model_work
def measure_artifacts(models, prepared, out=None, split: str = "test", images: int = 20, beam_size: int = 3,
                      threads: int = 1) -> dict[str, float]:
    """``measure_latency`` of many artifacts back to back in one process, on the first ``images``
    images of a prepared dataset's ``split``: {file stem: ms}, also written to ``out`` if given.

    One job times every variant on an otherwise idle machine, so the numbers compare; evaluation
    itself then needs no exclusive machine.
    """
    from pathlib import Path

    from tqdm import tqdm

    from ..io import write_json
    from ..data.prepare import split_images

    paths = split_images(prepared, split)[1][:images]
    ms = {}
    for model in tqdm(models, desc="latency", unit="model"):
        ms[Path(model).name.removesuffix(".capz")] = measure_latency(
            load_captioner(model, device="cpu", threads=threads), paths, beam_size, threads)
    if out is not None:
        write_json(out, ms)
    return ms
