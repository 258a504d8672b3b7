"""Beam search on ONNX Runtime three ways: the selection in numpy, the selection inside the step graph,
and the whole search inside one graph.

    numpy      ``beam_search(numpy_select(step))``: one runtime call per step, selection in numpy
    graph      ``beam_search(OrtCaptioner.select)``: one call per step, selection in the graph (``beam_step``)
    loop       ``OrtCaptioner.search``: one call per search, a Loop over the beam step (``search_graph``)

All three run the same int8 graphs of one model (``latency.py``'s random-init lite0 captioners
at the experiment's widths, or ``--run RUN_DIR``'s trained lite0 fp32 artifacts quantized with
``latency.py``'s calibration), from the same encoder features, taking turns per image; all must
give the same captions. Prints the CPU's flags, the median time of one search (beam 3, one thread)
each way, and the ratios.

    .venv/bin/python benchmarks/beam_step.py [--runs 50] [--run work/synth] [--decoders updown ...]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from latency import BEAM, IMAGES, ROOT, cpu, ort_captioners, random_captioner

from captioning.captioner import load_captioner
from captioning.deploy.ort_search import OrtCaptioner, beam_search, numpy_select


def int8_captioner(dec: str, config: dict, run: Path | None) -> OrtCaptioner:
    lite0 = (load_captioner(run / "artifacts" / f"lite0-{dec}-xe-fp32.capz", device="cpu", threads=1) if run else
             random_captioner("tf_efficientnet_lite0", config["encoders"]["lite0"]["img_size"], dec, config))
    return ort_captioners(lite0)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="timed searches per way (median)")
    ap.add_argument("--run", type=Path, help="a finished run's folder (work/<dataset>): its lite0 fp32 artifacts")
    ap.add_argument("--decoders", nargs="+", default=["updown", "aoanet", "transformer"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # harmless: see onnx_export's docstring
    model, flags = cpu()
    print(f"CPU: {model}; " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in flags.items()))
    print(f"one beam search (beam {BEAM}, 1 thread, int8 graphs), median of {args.runs}, ms\n")
    print("| decoder | steps | numpy selection | selection in the graph | search in one graph "
          "| graph vs numpy | loop vs graph | loop vs numpy |\n" + "|---" * 8 + "|")
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    for dec in args.decoders:
        ort = int8_captioner(dec, config, args.run)
        numpy_way, graph_way = numpy_select(ort.step), ort.select
        ways = {"numpy": lambda ctx, state: beam_search(numpy_way, ctx, state, BEAM, ort.max_length),
                "graph": lambda ctx, state: beam_search(graph_way, ctx, state, BEAM, ort.max_length),
                "loop": lambda ctx, state: ort.search(ctx, state, BEAM)}
        times, steps = {w: [] for w in ways}, []
        for i in range(args.runs + 3):
            ctx, state = ort.start(*ort.encode(ort.images([IMAGES[i % len(IMAGES)]])))
            seqs = {}
            for way, search in ways.items():
                t0 = time.perf_counter()
                seqs[way] = search(ctx, state)
                times[way].append(time.perf_counter() - t0)
            if not (np.array_equal(seqs["numpy"], seqs["graph"]) and np.array_equal(seqs["numpy"], seqs["loop"])):
                raise SystemExit(f"{dec}: the searches gave different captions")
            steps.append(min(int((seqs["graph"] != 0).sum()) + 1, ort.max_length))  # words and the end token
        ms = {w: 1000 * statistics.median(t[3:]) for w, t in times.items()}
        print(f"| {dec} | {statistics.median(steps):.0f} | {ms['numpy']:.2f} | {ms['graph']:.2f} | {ms['loop']:.2f} "
              f"| {ms['numpy'] / ms['graph']:.2f}x | {ms['graph'] / ms['loop']:.2f}x | {ms['numpy'] / ms['loop']:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
