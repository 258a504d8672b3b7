"""Training memory and speed when features are streamed from HDF5 instead of held in memory.

Makes feature files with COCO's per-image shape (att 7x7x2048 float16, fc 2048 float16, about
200 KB per image) at two sizes plus matching prepared captions, and in a fresh process for each
trains an epoch slice (``--steps`` steps of a small Up-Down decoder, batch 50) in stream mode.
Prints each run's peak RSS (the training process, and its largest child: a reader process) and
steps/s, then the same for the in-memory path (and streaming) on a file that fits, and the ratios
the goal is stated in: peak RSS flat (within 10%) between the sizes and under 4 GB, stream
throughput >= 80% of memory.

Before each stream run the file's pages are dropped from the page cache (``posix_fadvise``), so
reads come from disk, as they would for a dataset larger than RAM (``--warm`` keeps the cache).
Runs go in rounds (``--repeat``) over all configurations, so that each sees the same share of
a shared CPU's load; the fastest run of each counts. Reader processes start as copies of the
training process at each epoch's start, so their RSS follows the trainer's at that moment.
Files go to ``--dir`` (default /tmp) and are deleted at the end; free space is checked first.

    .venv/bin/python benchmarks/streaming.py [--sizes 10000 40000] [--memory-size 2000] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COCO_SHAPE = (49, 2048)          # (HW, C) of a 7x7 ResNet grid
VOCAB, MAX_LEN, CAPS = 1000, 16, 5
DECODER = dict(input_encoding_size=128, rnn_size=128, att_hid_size=64)


# ---- data ----------------------------------------------------------------------------------------

def file_bytes(n: int, hw: int, c: int) -> int:
    """About what ``make_dataset`` writes for n images (features, captions are small)."""
    return n * (hw + 1) * c * 2


def make_dataset(root: Path, n: int, hw: int = COCO_SHAPE[0], c: int = COCO_SHAPE[1], n_val: int | None = None,
                 seed: int = 0) -> tuple[Path, Path]:
    """features.h5 + prepared dir (images.json, vocab.json, labels.h5, refs_val.json) for n images,
    in the formats the pipeline writes. Features are a random block tiled, each row marked with its
    number (every row differs; writing stays at disk speed); captions are random words."""
    import h5py

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    prep = root / "prepared"
    prep.mkdir(exist_ok=True)
    n_val = max(1, min(500, n // 10)) if n_val is None else n_val
    splits = ["train"] * (n - n_val) + ["val"] * n_val
    (prep / "images.json").write_text(json.dumps(
        [{"id": i, "file_path": f"img/{i}.jpg", "split": s} for i, s in enumerate(splits)]))
    (prep / "vocab.json").write_text(json.dumps(
        {"itow": {str(i): f"w{i}" for i in range(1, VOCAB + 1)}, "max_length": MAX_LEN}))
    lengths = rng.integers(3, MAX_LEN + 1, n * CAPS)
    labels = rng.integers(1, VOCAB + 1, (n * CAPS, MAX_LEN)).astype(np.int32)
    labels[np.arange(MAX_LEN) >= lengths[:, None]] = 0
    with h5py.File(prep / "labels.h5", "w") as f:
        f["labels"] = labels
        f["label_start_ix"] = np.arange(n, dtype=np.int64) * CAPS
        f["label_end_ix"] = np.arange(1, n + 1, dtype=np.int64) * CAPS
    anns = [{"image_id": i, "id": i * CAPS + j, "caption": " ".join(f"w{w}" for w in labels[i * CAPS + j] if w)}
            for i in range(n - n_val, n) for j in range(CAPS)]
    (prep / "refs_val.json").write_text(json.dumps(
        {"images": [{"id": i} for i in range(n - n_val, n)], "annotations": anns}))

    block = min(n, 256)
    att0 = rng.standard_normal((block, hw, c), dtype=np.float32).astype(np.float16)
    fc0 = att0.astype(np.float32).mean(1).astype(np.float16)
    feats = root / "features.h5"
    with h5py.File(feats, "w") as f:
        f["ids"] = np.arange(n, dtype=np.int64)
        fc_ds = f.create_dataset("fc", (n, c), dtype="float16")
        att_ds = f.create_dataset("att", (n, hw, c), dtype="float16", chunks=(1, hw, c))
        for i in range(0, n, block):
            m = min(block, n - i)
            att, fc = att0[:m].copy(), fc0[:m].copy()
            for x in (att[:, 0], fc):   # the row number in the first two channels: every row differs
                x[:, 0], x[:, 1] = np.arange(i, i + m) % 2048, np.arange(i, i + m) // 2048
            att_ds[i:i + m], fc_ds[i:i + m] = att, fc
    return feats, prep


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget this file's cached pages (this file only; no privileges needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---- one measured run (in a fresh process) -------------------------------------------------------

def child(feats: str, prep: str, mode: str, workers: int, steps: int, batch_size: int) -> None:
    """Train ``steps`` steps reading features as ``mode``; print {"steps_per_s", "rss_mb", "reader_rss_mb"}."""
    import torch

    from captioning.models import create_decoder
    from captioning.training.amp import MixedPrecision, optimizer_step
    from captioning.training.loop import open_data, trim_padding
    from captioning.training.xe import XEStep

    torch.manual_seed(0)
    data = open_data(feats, prep, CAPS, mode, 0, workers)
    decoder = create_decoder("updown", data.vocab_size, data.feat_dim, **DECODER).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=5e-4)
    step, mp = XEStep(MixedPrecision(False, "cpu")), MixedPrecision(False, "cpu")
    t0, done, epoch = time.perf_counter(), 0, 0
    while done < steps:  # a small file's epoch is shorter than the slice: go on into the next
        batches = data.batches("train", batch_size, shuffle=True, generator=torch.Generator().manual_seed(epoch))
        for b in batches:
            b.labels = trim_padding(b.labels)
            loss, _ = step(decoder, b)
            optimizer_step(loss, decoder, optimizer, mp.scaler, 0.1)
            done += 1
            if done == steps:
                break
        batches.close()  # stops and reaps the reader processes, so their peak RSS is counted
        epoch += 1
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as f:  # VmHWM: ru_maxrss would include the launching process's peak
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    print(json.dumps({"steps": done, "steps_per_s": done / seconds, "rss_mb": peak,
                      "reader_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def measure(feats: Path, prep: Path, mode: str, workers: int, steps: int, batch_size: int, cold: bool) -> dict:
    if cold:
        drop_cache(feats)
    cmd = [sys.executable, __file__, "--child", str(feats), str(prep), mode, str(workers), str(steps), str(batch_size)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise SystemExit(f"run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- main ----------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        f, p, mode, workers, steps, bs = sys.argv[2:8]
        return child(f, p, mode, int(workers), int(steps), int(bs))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000], help="images per streamed file")
    ap.add_argument("--memory-size", type=int, default=2000, help="images of the in-memory comparison file")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the fastest counts, the highest RSS")
    ap.add_argument("--warm", action="store_true", help="keep the file in the page cache for stream runs")
    a = ap.parse_args()

    need = sum(file_bytes(n, *COCO_SHAPE) for n in a.sizes + [a.memory_size])
    free = shutil.disk_usage(a.dir).free
    if need > 0.8 * free:
        raise SystemExit(f"{a.dir}: {free / 1e9:.1f} GB free, the files need {need / 1e9:.1f} GB; pass smaller --sizes")
    print(f"COCO-shaped features (att {COCO_SHAPE[0]}x{COCO_SHAPE[1]} + fc, float16, "
          f"{file_bytes(1, *COCO_SHAPE) / 1e3:.0f} KB/image); Up-Down {DECODER}, batch {a.batch_size}, "
          f"{a.steps} steps, {os.cpu_count()} CPUs, torch threads default; stream: {a.workers} readers, "
          f"{'warm' if a.warm else 'cold'} page cache; {a.repeat} rounds over all runs")
    configs = [(a.memory_size, "memory"), (a.memory_size, "stream")] + [(n, "stream") for n in a.sizes]
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="streaming-bench-") as tmp:
        files = {}
        for n in dict.fromkeys(n for n, _ in configs):
            t0 = time.perf_counter()
            files[n] = make_dataset(Path(tmp) / str(n), n)
            print(f"made {n} images: {files[n][0].stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        runs: dict = {c: [] for c in configs}
        for _ in range(a.repeat):  # rounds over all runs: each sees the same share of a shared CPU's load
            for n, mode in configs:
                runs[n, mode].append(measure(*files[n], mode, a.workers if mode == "stream" else 0, a.steps,
                                             a.batch_size, cold=mode == "stream" and not a.warm))
    rows = []
    for (n, mode), rs in runs.items():
        r = {"n": n, "mode": mode, "steps_per_s": max(x["steps_per_s"] for x in rs),
             "rss_mb": max(x["rss_mb"] for x in rs), "child_rss_mb": max(x["reader_rss_mb"] for x in rs)}
        rows.append(r)
        each = ", ".join(f"{x['steps_per_s']:.2f}" for x in rs)
        print(f"{mode:6s} {n:6d} images: {r['steps_per_s']:5.2f} steps/s (best of {each}), peak RSS "
              f"{r['rss_mb']:5.0f} MB, largest child process {r['child_rss_mb']:5.0f} MB")
    mem, same, streamed = rows[0], rows[1], rows[2:]
    small, big = streamed[0], streamed[-1]
    peak = max(max(r["rss_mb"], r["child_rss_mb"]) for r in streamed)
    print(f"peak RSS of training, {big['n']} vs {small['n']} images: {big['rss_mb'] / small['rss_mb']:.3f}x; "
          f"highest process {peak:.0f} MB (goal: within 1.10x, under 4096 MB)")
    print(f"throughput stream / memory ({mem['n']} images in memory: {mem['steps_per_s']:.2f} steps/s): "
          + ", ".join(f"stream {r['n']} images {r['steps_per_s'] / mem['steps_per_s']:.2f}" for r in [same] + streamed)
          + " (goal >= 0.80)")


if __name__ == "__main__":
    main()
