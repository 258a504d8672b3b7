"""`captioning <verb>`: the command line the workflow's rules call. Each verb calls one library function.

Options several verbs share are declared once (argparse parents) and mean the same everywhere.
``--beam`` is an alias of ``--beam-size``.

Threads: ``--threads`` of ``train``, ``scst`` and ``prune`` is torch's CPU thread count for the
whole run; ``main`` sets it once, before the verb runs, and the library functions never set it.
``--threads`` of ``evaluate`` and ``latency`` is the thread count of the latency timing only
(``evaluation.latency``): their captioning runs with torch's default thread count, which the
evaluation's scores were always computed with, so the results table does not depend on it.

Every verb that succeeds prints, as its last log line, its model work in seconds (``timing``), which
``benchmarks/rules.py`` sets against the job's wall time. A user mistake (``UserError``) prints one line and exits 2; Ctrl-C exits 130; anything else is a
bug and keeps its traceback. Imports are lazy, so ``captioning --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def cmd_synth(a):
    from .data.synthetic import generate

    generate(a.out, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, img_size=a.img_size, seed=a.seed)


def cmd_prepare(a):
    from .data.prepare import prepare

    prepare(a.dataset_json, a.image_root, a.out, word_count_threshold=a.word_count_threshold,
            max_length=a.max_length)


def cmd_encoder(a):
    from .encoders import make_encoder

    make_encoder(a.timm_name, a.img_size, a.weights, objects=a.objects, prepared=a.prepared, pretrain=a.pretrain,
                 seed=a.seed, device=a.device, out=a.out, log_json=a.log_json)


def cmd_extract(a):
    from .encoders import extract_dataset

    if (a.shard is None) != (a.shards is None):
        raise UserError("--shard and --shards go together (shard I of N)")
    shard = None if a.shard is None else (a.shard, a.shards)
    extract_dataset(a.encoder, a.prepared, a.out, batch_size=a.batch_size, device=a.device, shard=shard)


def cmd_merge_features(a):
    from .encoders.features import merge_features

    merge_features(a.shard_files, a.out)


def cmd_train(a):
    from .training import train_xe

    train_xe(a.features, a.prepared, a.out, a.decoder, a.decoder_config, seed=a.seed,
             device=a.device, log_json=a.log_json, **a.train_config)


def cmd_scst(a):
    from .training import train_scst

    train_scst(a.decoder, a.features, a.prepared, a.out, seed=a.seed, device=a.device, log_json=a.log_json,
               **a.scst)


def cmd_prune(a):
    from .training import finetune_pruned

    finetune_pruned(a.decoder, a.features, a.prepared, a.out, a.method, a.ratio, seed=a.seed,
                    device=a.device, log_json=a.log_json, teacher=a.teacher, **a.finetune)


def cmd_pack(a):
    from .captioner import pack_variant
    from .evaluation.evaluate import caption_artifact

    size, storage = pack_variant(a.out, a.encoder, a.decoder, a.prepared, a.quantization, a.meta,
                                 runtime=a.runtime, calibration_images=a.calibration_images,
                                 calibration_cache=a.encoder_cache)
    print(f"{a.out}: {size / 1e6:.2f} MB (floor {storage['floor_bytes'] / 1e6:.2f} MB)")
    if a.caption_dir:  # in the same process: one start-up for packing and captioning
        caption_artifact(a.out, a.prepared, a.caption_dir, beam_size=a.beam_size, device=a.device, meta=a.meta,
                         encoder_cache=a.encoder_cache)


SPICE = {"auto": "auto", "on": True, "off": False}


def cmd_evaluate(a):
    from .evaluation.evaluate import evaluate

    m = evaluate(a.model, a.prepared, a.out_dir, split=a.split, beam_size=a.beam_size,
                 latency_images=a.latency_images, threads=a.timing_threads, spice=SPICE[a.spice],
                 device=a.device, meta=a.meta)
    print(json.dumps({k: m[k] for k in ("CIDEr", "size_mb", "latency_ms")}))


def cmd_score(a):
    from .evaluation.evaluate import score_variants
    from .evaluation.metrics import score_many

    if a.eval_dirs:
        score_variants(a.refs, a.eval_dirs, cache_dir=a.cache, spice=SPICE[a.spice])
        return
    if a.cache:
        raise UserError("--cache goes with --eval-dirs (it caches the metrics.json of variant dirs), not --results")
    scores = score_many(a.refs, a.results, spice=SPICE[a.spice])
    named = {str(r): s for r, s in zip(a.results, scores)}
    print(json.dumps(scores[0] if len(scores) == 1 else named, indent=1))


def cmd_latency(a):
    from .evaluation.latency import measure_artifacts

    ms = measure_artifacts(a.models, a.prepared, a.out, split=a.split, images=a.images, beam_size=a.beam_size,
                           threads=a.timing_threads)
    print(f"{len(ms)} artifacts timed -> {a.out}")


def cmd_table(a):
    from .results.table import write_results

    df = write_results(a.metrics, a.baselines, a.out_dir, a.latency)
    print(f"{len(df)} variants -> {a.out_dir}/table.csv")


def cmd_caption(a):
    from .captioner import load_captioner

    captions = load_captioner(a.model, device=a.device, runtime=a.runtime).caption_files(
        list(a.images), beam_size=a.beam_size)
    if a.json:
        print(json.dumps([{"image": p, "caption": c} for p, c in zip(a.images, captions)], indent=1))
    else:
        for p, c in zip(a.images, captions):
            print(f"{p}\t{c}")


def cmd_export(a):
    from .captioner import load_captioner
    from .deploy.bundle import export_bundle

    for path in export_bundle(load_captioner(a.model, runtime="onnxruntime"), a.out):
        print(path)


def _shared(*flags, **kwargs) -> argparse.ArgumentParser:
    """A parent parser holding one option, for the verbs that share it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(*flags, **kwargs)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="captioning", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name, fn, help, *parents):
        s = sub.add_parser(name, help=help, description=help, parents=parents)
        s.set_defaults(fn=fn)
        return s

    out = _shared("--out", required=True, help="the output path")
    seed = _shared("--seed", type=int, default=0)
    device = _shared("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")
    log_json = _shared("--log-json", help="also write the run's report here as JSON")
    prepared = _shared("--prepared", required=True, help="the prepared-captions directory")
    features = _shared("--features", required=True, help="the features HDF5 of the decoder's encoder")
    threads = _shared("--threads", type=int, metavar="N",
                      help="torch CPU threads for the whole run (default: torch's own)")
    timing_threads = _shared("--threads", dest="timing_threads", type=int, default=1, metavar="N",
                             help="CPU threads of the latency timing only; the captioning that is scored "
                                  "runs with torch's default thread count")
    beam = _shared("--beam-size", "--beam", dest="beam_size", type=_positive_int, default=3, help="beam width (1: greedy)")
    split = _shared("--split", default="test")
    model = _shared("--model", required=True, help="a .capz artifact")
    meta = _shared("--meta", type=_json_arg, default={}, help="what this variant is, as JSON")
    run = (features, prepared, seed, threads, device, out, log_json)  # the training verbs

    s = verb("synth", cmd_synth, "generate the synthetic captioning dataset (Karpathy format)", out, seed)
    s.add_argument("--n-train", type=int, default=2000)
    s.add_argument("--n-val", type=int, default=200)
    s.add_argument("--n-test", type=int, default=300)
    s.add_argument("--img-size", type=int, default=128)

    s = verb("prepare", cmd_prepare, "build vocabulary, encoded labels and references from a Karpathy JSON", out)
    s.add_argument("--dataset-json", required=True)
    s.add_argument("--image-root", required=True)
    s.add_argument("--word-count-threshold", type=int, default=5)
    s.add_argument("--max-length", type=int, default=16, help="caption length limit, kept with the data")

    s = verb("encoder", cmd_encoder, "make an encoder's weights: from a file, a package, or in-domain pretraining",
             seed, device, out, log_json)
    s.add_argument("--timm-name", required=True)
    s.add_argument("--img-size", type=int, default=128)
    s.add_argument("--weights", default="pretrain",
                   help="pretrain | random | efficientnet-lite0 | path to .safetensors/.pth")
    s.add_argument("--objects", help="objects.json (for --weights pretrain)")
    s.add_argument("--prepared", help="prepared-captions directory (for --weights pretrain)")
    s.add_argument("--pretrain", type=_json_arg, default={}, help="pretraining settings as JSON")

    s = verb("extract", cmd_extract, "extract grid + pooled features of every image into HDF5", prepared, device, out)
    s.add_argument("--encoder", required=True)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--shard", type=int, metavar="I", help="encode only shard I (0-based) of --shards")
    s.add_argument("--shards", type=int, metavar="N", help="the number of contiguous slices the images are cut into")

    s = verb("merge-features", cmd_merge_features, "merge the shard files of one extraction into one features HDF5",
             out)
    s.add_argument("shard_files", nargs="+", metavar="SHARD", help="every shard file of the extraction")

    s = verb("train", cmd_train, "train a decoder with cross-entropy on cached features", *run)
    s.add_argument("--decoder", required=True, help="decoder architecture name, e.g. updown")
    s.add_argument("--decoder-config", type=_json_arg, default={})
    s.add_argument("--train-config", type=_json_arg, default={})

    s = verb("scst", cmd_scst, "continue training a decoder with self-critical sequence training (CIDEr-D reward)",
             *run)
    s.add_argument("--decoder", required=True, help="the cross-entropy checkpoint to start from")
    s.add_argument("--scst", type=_json_arg, default={}, help="SCST settings as JSON")

    s = verb("prune", cmd_prune, "prune a decoder to a ratio of zero weights, then fine-tune with the mask fixed",
             *run)
    s.add_argument("--decoder", required=True, help="the trained decoder checkpoint to prune")
    s.add_argument("--method", default="global", choices=["global", "layerwise", "gradual", "lamp", "gradual_lamp"])
    s.add_argument("--ratio", type=float, required=True, help="fraction of the decoder's weights set to zero (0: the dense control, the same fine-tuning)")
    s.add_argument("--finetune", type=_json_arg, default={}, help="fine-tuning settings as JSON")
    s.add_argument("--teacher", help="with finetune kd_teacher scst: the decoder's SCST checkpoint, which teaches")

    s = verb("pack", cmd_pack, "pack encoder + decoder + vocabulary into one .capz artifact", prepared, meta, out,
             beam, device)
    s.add_argument("--encoder", required=True)
    s.add_argument("--decoder", required=True)
    s.add_argument("--quantization", default="fp32", choices=["fp32", "fp16", "int8"])
    s.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="the engine the artifact runs on by default (the same tensors are stored for both)")
    s.add_argument("--calibration-images", type=int, default=0,
                   help="training images that calibrate the encoder's activations (int8 on onnxruntime)")
    s.add_argument("--caption-dir", help="also caption the test images with the packed artifact: captions.json "
                                         "and variant.json here (for `score --eval-dirs`)")
    s.add_argument("--encoder-cache", help="a folder where variants with identical encoders share the encoder's "
                                           "outputs on the test images and its int8 ONNX Runtime calibration "
                                           "(the artifacts and captions are the same without it)")

    s = verb("evaluate", cmd_evaluate, "caption the raw test images from an artifact and score them",
             model, prepared, split, beam, timing_threads, device, meta)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--latency-images", type=int, default=20,
                   help="test images timed for latency_ms; 0 leaves it to the latency verb")
    s.add_argument("--spice", default="auto", choices=list(SPICE))

    s = verb("score", cmd_score, "score COCO-format captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE")
    s.add_argument("--refs", required=True, help="reference captions, COCO annotation format")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--results", nargs="+", help="COCO results files ([{image_id, caption}]): print their metrics")
    what.add_argument("--eval-dirs", nargs="+", help="variant dirs (captions.json + variant.json): write metrics.json")
    s.add_argument("--cache", help="with --eval-dirs: reuse the scores of unchanged captions from this dir")
    s.add_argument("--spice", default="auto", choices=list(SPICE))

    s = verb("latency", cmd_latency, "time artifacts one after another (batch 1, raw test images)",
             prepared, split, beam, timing_threads, out)
    s.add_argument("--models", nargs="+", required=True)
    s.add_argument("--images", type=int, default=20, help="test images timed per artifact")

    s = verb("table", cmd_table, "collect metrics into results/table.csv, table.md and pareto.png")
    s.add_argument("--metrics", nargs="+", required=True)
    s.add_argument("--baselines", nargs="+", required=True,
                   help="per decoder, the variant its rows' changes are measured against")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--latency", help="JSON {variant: ms} from the latency verb")

    s = verb("caption", cmd_caption, "caption images with an artifact alone", model, beam, device)
    s.add_argument("images", nargs="+")
    s.add_argument("--runtime", choices=["torch", "onnxruntime"],
                   help="run on this engine (default: the one the artifact was packed for, which the table measured)")
    s.add_argument("--json", action="store_true")

    s = verb("export", cmd_export, "write an artifact as one ONNX model (image tensor to word ids, beam search "
             "inside) and captioner.json into a folder, for a runtime without Python", model)
    s.add_argument("--out", required=True, help="the folder to write")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .timing import model_seconds, timing_line
    from .utils import offline_hub, set_threads

    offline_hub()
    if getattr(args, "threads", None):  # the training verbs' --threads (see the module docstring)
        set_threads(args.threads)
    before = model_seconds()
    try:
        args.fn(args)
        print(timing_line(args.verb, model_seconds() - before), file=sys.stderr)
    except UserError as e:
        print(f"captioning {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"captioning {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0
