"""Time pycocoevalcap's Cider against our vectorised CIDEr-D on the same 5,000 real captions.

Captions: tests/data/karpathy_test_captions.json (a real Up-Down model on the Karpathy test
split); references: COCO val2014 from pycocoevalcap's SPICE jar. Both are PTB-tokenised once,
before timing, as COCOEvalCap does. Prints both times, the speed-up and the largest score gap.
Also times the SCST use: df fixed once, then many small batches scored.

    .venv/bin/python benchmarks/cider_speed.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from captioning.evaluation.cider import CiderD, corpus_cider_d
from captioning.evaluation.metrics import bundled_coco_refs, ptb_tokenize

ROOT = Path(__file__).resolve().parents[1]


def best_of(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each; the fastest counts")
    args = ap.parse_args()

    from pycocoevalcap.cider.cider import Cider

    results = json.loads((ROOT / "tests/data/karpathy_test_captions.json").read_text())
    refs = {}
    for a in bundled_coco_refs("val2014")["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    ids = [r["image_id"] for r in results]
    gts = ptb_tokenize({i: refs[i] for i in ids})
    res = ptb_tokenize({r["image_id"]: [r["caption"]] for r in results})
    print(f"{len(ids)} images, {sum(map(len, gts.values()))} references (tokenised once, not timed)")

    t_ref, (m_ref, s_ref) = best_of(lambda: Cider().compute_score(gts, res), args.repeat)
    t_our, (m_our, s_our) = best_of(lambda: corpus_cider_d(gts, res), args.repeat)
    gap = float(np.abs(np.asarray(s_ref) - s_our).max())
    print(f"pycocoevalcap Cider : {t_ref:7.3f} s  CIDEr-D {m_ref:.6f}")
    print(f"ours (corpus mode)  : {t_our:7.3f} s  CIDEr-D {m_our:.6f}  max per-image gap {gap:.1e}")
    print(f"speed-up            : {t_ref / t_our:7.1f}x")

    # SCST use: document frequencies once, then batches of 50 images x 5 sampled captions
    t0 = time.perf_counter()
    scorer = CiderD(gts)
    t_init = time.perf_counter() - t0
    cands = [res[i][0] for i in gts]
    keys = list(gts)
    t0 = time.perf_counter()
    for b in range(0, len(keys), 50):
        bi = [i for i in keys[b:b + 50] for _ in range(5)]
        bc = [c for c in cands[b:b + 50] for _ in range(5)]
        scorer.scores(bi, bc)
    t_batches = time.perf_counter() - t0
    print(f"fixed-df CiderD     : build {t_init:.3f} s, then {len(keys) * 5} captions in batches of 250: "
          f"{t_batches:.3f} s ({len(keys) * 5 / t_batches:,.0f} captions/s)")


if __name__ == "__main__":
    main()
