"""End-to-end captioning latency per image, torch against ONNX Runtime, fp32 against int8.

One image file in, one caption string out (load, resize, normalise, encoder, beam search, decode),
batch 1, beam 3, one thread for torch and for ONNX Runtime; the median of ``--runs`` timed
captions after ``--warmup`` untimed ones, cycling over tests/data/coco5's images, the five models
taking turns (``median_ms``). Per decoder (``--decoders``, default the three families and their
slim variants):

    r50 fp32 torch     the baseline (resnet50 encoder, with the family's decoder: a slim variant's baseline)
    lite0 fp32 torch   tf_efficientnet_lite0 encoder
    lite0 int8 torch   ``quantize_captioner(..., "int8")``: weight-only int8 (int8-grid weights, fp32 compute)
    lite0 fp32 ORT     the same model's ONNX graphs on ONNX Runtime
    lite0 int8 ORT     static int8 encoder (calibrated on 32 images, its costliest units float as pack picks them), dynamic int8 decoder matmuls

By default the models are random-init at the default experiment's widths (config.yaml: decoders,
encoders' img_size, caption length 16) with a 200-word vocabulary, and the end token's output bias
is set to -1e4 so every caption runs the full 16 steps: timings do not depend on when random
weights happen to stop. ``--run RUN_DIR`` times a finished run's artifacts instead
(RUN_DIR/artifacts/{enc}-{dec}-xe-{quant}.capz), whose captions stop where the trained models do.

A second table splits the time of lite0 fp32 torch and lite0 int8 ORT into the image file to the
encoder's input tensor, which both pay alike, and the tensor to the caption, and gives the
end-to-end speed-up's bound: the torch total over the image part. A third splits lite0 int8 ORT's
caption into its parts (image, encoder, decoder set-up, search) and gives the time a 5x speed-up
over lite0 fp32 torch, and a 10x one over r50, leave for the search. ONNX Runtime captions in one
call (``captioner_graph``), so its parts are timed as three calls after it, on the same image.

tests/data/coco5 holds 2 training images, so the 32 calibration images are random crops and flips
of them (a real run calibrates on ``compress.calibration_images`` training images).

    .venv/bin/python benchmarks/latency.py [--runs 20] [--warmup 3] [--run work/synth] [--decoders updown ...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioning.captioner import Captioner, load_captioner, quantize_captioner  # noqa: E402
from captioning.data.images import load_rgb, to_tensor  # noqa: E402
from captioning.data.prepare import decode  # noqa: E402
from captioning.deploy.onnx_export import export_captioner  # noqa: E402
from captioning.deploy.ort_quantize import encoder_ranges, float_units, has_vnni, quantize_graphs  # noqa: E402
from captioning.deploy.ort_search import OrtCaptioner  # noqa: E402
from captioning.encoders import create_encoder  # noqa: E402
from captioning.models import create_decoder  # noqa: E402
from captioning.variants import decoder_family, decoder_settings  # noqa: E402

DECODERS = ("updown", "aoanet", "transformer", "updown_slim", "aoanet_slim", "transformer_slim")
ROWS = ("r50 fp32 torch", "lite0 fp32 torch", "lite0 int8 torch", "lite0 fp32 ORT", "lite0 int8 ORT")
ARTIFACT_QUANT = dict(zip(ROWS, ("fp32", "fp32", "int8", "fp32_ort", "int8_ort")))
IMAGES = sorted((ROOT / "tests/data/coco5").glob("*/*.jpg"))
TRAIN_IMAGES = sorted((ROOT / "tests/data/coco5/train2014").glob("*.jpg"))
WORDS, MAX_LEN, BEAM, CALIBRATION = 200, 16, 3, 32
ORT_PARTS = ("encoder", "decoder set-up", "search")  # the graphs OrtCaptioner's one call joins (captioner_graph)


def cpu() -> tuple[str, dict[str, bool]]:
    """The CPU's model name and whether it has the int8 instructions ONNX Runtime's kernels use."""
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return model, {"AVX2": "avx2" in flags, "AVX512-VNNI": "avx512_vnni" in flags, "AVX-VNNI": "avx_vnni" in flags}


def calibration_images(encoder) -> torch.Tensor:
    """CALIBRATION random crops (half to all of each side) and flips of the training images, as the encoder takes them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(CALIBRATION):
        im = load_rgb(TRAIN_IMAGES[i % len(TRAIN_IMAGES)])
        w, h = im.size
        s = 0.5 + 0.5 * torch.rand(1, generator=g).item()
        cw, ch = int(w * s), int(h * s)
        x, y = (int(torch.randint(0, n + 1, (1,), generator=g)) for n in (w - cw, h - ch))
        im = im.crop((x, y, x + cw, y + ch))
        if torch.rand(1, generator=g).item() < 0.5:
            im = im.transpose(0)  # Image.FLIP_LEFT_RIGHT
        out.append(to_tensor(im, encoder.img_size, encoder.mean, encoder.std))
    return torch.stack(out)


def random_captioner(timm_name: str, img_size: int, dec: str, config: dict) -> Captioner:
    """A random-init captioner at the experiment's widths whose captions never end before MAX_LEN."""
    encoder = create_encoder(timm_name, img_size=img_size)
    settings = decoder_settings(config, dec)
    arch = settings["arch"]
    settings = {k: v for k, v in settings.items() if k not in ("arch", "train", "variant_of")}
    decoder = create_decoder(arch, vocab_size=WORDS, feat_dim=encoder.feat_dim, **settings)
    head = decoder.generator if arch == "transformer" else decoder.logit
    with torch.no_grad():
        head.bias[0] = -1e4  # the end token (class 0): never chosen, so every caption is MAX_LEN words
    return Captioner(encoder, decoder, {i: f"w{i}" for i in range(1, WORDS + 1)}, MAX_LEN)


def ort_captioners(lite0: Captioner) -> tuple[OrtCaptioner, OrtCaptioner]:
    """``lite0`` on ONNX Runtime in fp32 and in int8, its encoder calibrated on ``calibration_images``."""
    graphs = export_captioner(lite0)
    images = calibration_images(lite0.encoder).numpy()
    ranges = encoder_ranges(graphs["encoder"], images)
    int8 = quantize_graphs(graphs, ranges, float_units(graphs["encoder"], ranges, images))  # as pack does
    ort_fp32, ort_int8 = (OrtCaptioner(g, lite0.itow, lite0.max_length) for g in (graphs, int8))
    ort_fp32.torch = ort_int8.torch = lite0  # image files are read by the torch encoder's settings
    return ort_fp32, ort_int8


def random_models(dec: str, config: dict) -> dict:
    """The five captioners of a decoder, random-init (see the module docstring)."""
    size = {name: config["encoders"][name]["img_size"] for name in ("r50", "lite0")}
    lite0 = random_captioner("tf_efficientnet_lite0", size["lite0"], dec, config)
    return dict(zip(ROWS, (random_captioner("resnet50", size["r50"], decoder_family(config, dec), config), lite0,
                           quantize_captioner(lite0, "int8"), *ort_captioners(lite0))))


def run_models(dec: str, family: str, run_dir: Path) -> dict:
    """The five captioners of a decoder from a finished run's artifacts (r50: the family's baseline)."""
    out = {}
    for row in ROWS:
        enc = row.split()[0]
        path = run_dir / "artifacts" / f"{enc}-{family if enc == 'r50' else dec}-xe-{ARTIFACT_QUANT[row]}.capz"
        out[row] = load_captioner(path, device="cpu", threads=1)
    return out


def median_ms(models: dict, runs: int, warmup: int, words: int | None) -> dict[str, dict[str, float]]:
    """Per model, the median wall time in ms of captioning one image file (``total``) and of its two
    parts: the file to the encoder's input tensor (``image``: read, decode, resize, normalise) and
    that tensor to the caption (``model``), and for an ONNX Runtime model, which captions in one call,
    the three graphs that call joins, run as three calls after it (``ORT_PARTS``, each run twice and
    the second timed, as below); ``words``: the caption length every caption must have.

    The models take turns on the same image: on a shared machine whose speed drifts over seconds,
    every model sees the same drift, so their ratios hold better than when each model's runs come
    in one block (measured here: a block-wise row moved by 40% between two runs). In its turn a
    model captions the image twice and the second is timed: a model captioning a stream of images,
    its weights in the CPU's caches, as the block-wise timing measured before."""
    times = {row: {"image": [], "model": [], "total": []} for row in models}
    for i in range(warmup + runs):
        path = IMAGES[i % len(IMAGES)]
        for row, captioner in models.items():
            captioner.caption_files([path], beam_size=BEAM)
            t0 = time.perf_counter()
            images = captioner.images([path])  # what caption_files does for one file
            t1 = time.perf_counter()
            caption = captioner.caption_images(images, BEAM)[0]
            t2 = time.perf_counter()
            if isinstance(captioner, OrtCaptioner):  # then the parts as three runtime calls, timed apart
                captioner.search(*captioner.start(*captioner.encode(images)), BEAM)  # their sessions' turn to warm up
                t3 = time.perf_counter()
                fc, att = captioner.encode(images)
                ta = time.perf_counter()
                ctx, state = captioner.start(fc, att)
                tb = time.perf_counter()
                parts = decode(captioner.itow, captioner.search(ctx, state, BEAM)[0].tolist())
                tc = time.perf_counter()
                if parts != caption:
                    raise SystemExit(f"the parts captioned {parts!r}, the joined graph {caption!r}")
                for part, t in zip(ORT_PARTS, (ta - t3, tb - ta, tc - tb)):
                    times[row].setdefault(part, []).append(t)
            for part, t in zip(("image", "model", "total"), (t1 - t0, t2 - t1, t2 - t0)):
                times[row][part].append(t)
            if words is not None and len(caption.split()) != words:
                raise SystemExit(f"a caption of {len(caption.split())} words, not {words}: {caption!r}")
    return {row: {part: 1000 * statistics.median(t[warmup:]) for part, t in parts.items()}
            for row, parts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="timed captions per model (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed captions first")
    ap.add_argument("--run", type=Path, help="a finished run's folder (work/<dataset>): time its artifacts")
    ap.add_argument("--decoders", nargs="+", default=list(DECODERS), help="config.yaml decoders entries to time")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, flags = cpu()
    print(f"CPU: {model}; " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in flags.items()))
    print(f"ORT int8 weights: {'8-bit (VNNI)' if has_vnni() else '7-bit (no VNNI: avoids int16 saturation)'}")
    if args.run:
        print(f"models: artifacts of {args.run}; captions stop where the trained models do")
    else:
        print(f"models: random-init, config.yaml widths, {WORDS} words; end token disabled, so every caption "
              f"runs the full {MAX_LEN} steps; ORT int8 calibrated on {CALIBRATION} crops of "
              f"{len(TRAIN_IMAGES)} training images")
    print(f"per image: file -> caption, batch 1, beam {BEAM}, 1 thread; median of {args.runs} after "
          f"{args.warmup} warm-up, the models taking turns; ms\n")
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    unknown = [d for d in args.decoders if d not in config["decoders"]]
    if unknown:
        raise SystemExit(f"--decoders: '{unknown[0]}' is not a decoders entry of config.yaml")
    print("| decoder | " + " | ".join(ROWS) + " | ORT int8 vs lite0 fp32 torch | ORT int8 vs r50 fp32 torch |")
    print("|---" * (len(ROWS) + 3) + "|")
    parts = {}
    for dec in args.decoders:
        family = decoder_family(config, dec)
        models = run_models(dec, family, args.run) if args.run else random_models(dec, config)
        ms = parts[dec] = median_ms(models, args.runs, args.warmup, None if args.run else MAX_LEN)
        total = {row: ms[row]["total"] for row in ROWS}
        int8 = total["lite0 int8 ORT"]
        print(f"| {dec} | " + " | ".join(f"{total[row]:.1f}" for row in ROWS)
              + f" | {total['lite0 fp32 torch'] / int8:.1f}x faster | {total['r50 fp32 torch'] / int8:.1f}x faster |",
              flush=True)
    print("\nWhere the time goes (same runs, ms): the image file to the encoder's input is the same work on both "
          "sides, so it bounds the end-to-end speed-up: at best lite0 fp32 torch's total over it.\n")
    print("| decoder | file -> tensor (lite0 int8 ORT) | lite0 fp32 torch: tensor -> caption "
          "| lite0 int8 ORT: tensor -> caption | speed-up, tensor -> caption | speed-up bound with the file |")
    print("|---" * 6 + "|")
    for dec, ms in parts.items():
        torch_fp32, ort_int8 = ms["lite0 fp32 torch"], ms["lite0 int8 ORT"]
        print(f"| {dec} | {ort_int8['image']:.1f} | {torch_fp32['model']:.1f} | {ort_int8['model']:.1f} "
              f"| {torch_fp32['model'] / ort_int8['model']:.1f}x | {torch_fp32['total'] / ort_int8['image']:.1f}x |")
    print("\nlite0 int8 ORT's caption by part (same runs, ms), against the time a 5x speed-up over lite0 fp32 "
          "torch and a 10x one over r50 fp32 torch allow: what is left of each for the search once the image, "
          "the encoder and the decoder set-up are done. The parts run as three calls; total is the one call that "
          "joins them, so it is less than their sum.\n")
    print("| decoder | file -> tensor | encoder | decoder set-up | search | total | 5x allows | left for the search "
          "| 10x vs r50 allows | left for the search |")
    print("|---" * 10 + "|")
    for dec, ms in parts.items():
        o = ms["lite0 int8 ORT"]
        before = o["image"] + o["encoder"] + o["decoder set-up"]
        five, ten = ms["lite0 fp32 torch"]["total"] / 5, ms["r50 fp32 torch"]["total"] / 10
        print(f"| {dec} | {o['image']:.2f} | {o['encoder']:.2f} | {o['decoder set-up']:.2f} | {o['search']:.2f} "
              f"| {o['total']:.2f} | {five:.2f} | {five - before:.2f} | {ten:.2f} | {ten - before:.2f} |")


if __name__ == "__main__":
    main()
