"""`captioning <verb>`: the command line the workflow's rules call. Each verb is a thin wrapper.

A user mistake (``UserError``) prints one line and exits 2; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError


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
    from .encoders import create_encoder, save_encoder
    from .io import read_json, write_json
    from .utils import seed_everything

    seed_everything(a.seed)
    enc = create_encoder(a.timm_name, img_size=a.img_size)
    history = {}
    if a.weights == "pretrain":
        from .encoders.pretrain import pretrain

        if not a.objects or not a.prepared:
            raise UserError("--weights pretrain needs --objects and --prepared")
        info = read_json(f"{a.prepared}/info.json")
        history = pretrain(enc, a.objects, f"{a.prepared}/images.json", info["image_root"],
                           seed=a.seed, device=a.device, **a.pretrain)
    elif a.weights != "random":
        from .encoders.weights import init_weights

        init_weights(enc, a.weights)
    save_encoder(enc, a.out)
    if a.log_json:
        write_json(a.log_json, {"weights": a.weights, "history": history})


def cmd_extract(a):
    from .encoders import load_encoder
    from .encoders.features import extract_features
    from .io import read_json

    info = read_json(f"{a.prepared}/info.json")
    extract_features(load_encoder(a.encoder), f"{a.prepared}/images.json", info["image_root"],
                     a.out, batch_size=a.batch_size, device=a.device)


def cmd_train(a):
    from .training.xe import train_xe
    from .utils import set_threads

    set_threads(a.threads)
    train_xe(a.features, a.prepared, a.out, a.decoder, a.decoder_config, seed=a.seed,
             device=a.device, log_json=a.log_json, **a.train_config)


def cmd_scst(a):
    from .training.scst import train_scst

    train_scst(a.decoder, a.features, a.prepared, a.out, seed=a.seed, device=a.device, threads=a.threads,
               log_json=a.log_json, **a.scst)


def cmd_prune(a):
    from .compress.prune import finetune_pruned
    from .utils import set_threads

    set_threads(a.threads)
    finetune_pruned(a.decoder, a.features, a.prepared, a.out, a.method, a.ratio, seed=a.seed,
                    device=a.device, log_json=a.log_json, **a.finetune)


def cmd_pack(a):
    from .captioner import pack_model
    from .compress.prune import measured_sparsity
    from .compress.quantize import storage_floor_bytes
    from .data.prepare import load_vocab
    from .encoders import load_encoder
    from .io import read_json
    from .models import load_decoder

    encoder, decoder = load_encoder(a.encoder), load_decoder(a.decoder)
    groups = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}
    storage = {**measured_sparsity(decoder), "floor_bytes": storage_floor_bytes(groups, a.quantization)}
    vocab = read_json(f"{a.prepared}/vocab.json")
    size = pack_model(a.out, encoder, decoder, load_vocab(a.prepared), max_len=vocab.get("max_length", 16),
                      extra={"variant": a.meta, "storage": storage}, quantization=a.quantization)
    print(f"{a.out}: {size / 1e6:.2f} MB (floor {storage['floor_bytes'] / 1e6:.2f} MB)")


SPICE = {"auto": "auto", "on": True, "off": False}


def cmd_evaluate(a):
    from .evaluation.evaluate import evaluate
    from .utils import pick_device

    m = evaluate(a.model, a.prepared, a.out_dir, split=a.split, beam_size=a.beam_size,
                 latency_images=a.latency_images, threads=a.threads, spice=SPICE[a.spice],
                 device=pick_device(a.device), meta=a.meta)
    print(json.dumps({k: m[k] for k in ("CIDEr", "size_mb", "latency_ms")}))


def cmd_latency(a):
    from .evaluation.evaluate import split_images
    from .evaluation.latency import measure_artifacts
    from .io import write_json

    _, paths = split_images(a.prepared, a.split)
    ms = measure_artifacts(a.models, paths[:a.images], a.beam_size, a.threads)
    write_json(a.out, ms)
    print(f"{len(ms)} artifacts timed -> {a.out}")


def cmd_table(a):
    from .results.table import write_results

    df = write_results(a.metrics, a.baselines, a.out_dir, a.latency)
    print(f"{len(df)} variants -> {a.out_dir}/table.csv")


def cmd_caption(a):
    from .captioner import load_captioner
    from .utils import pick_device

    cap = load_captioner(a.model, device=pick_device(a.device))
    captions = cap.caption_files(list(a.images), beam_size=a.beam)
    if a.json:
        print(json.dumps([{"image": p, "caption": c} for p, c in zip(a.images, captions)], indent=1))
    else:
        for p, c in zip(a.images, captions):
            print(f"{p}\t{c}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="captioning", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name, fn, help):
        s = sub.add_parser(name, help=help, description=help)
        s.set_defaults(fn=fn)
        return s

    s = verb("synth", cmd_synth, "generate the synthetic captioning dataset (Karpathy format)")
    s.add_argument("--out", required=True)
    s.add_argument("--n-train", type=int, default=2000)
    s.add_argument("--n-val", type=int, default=200)
    s.add_argument("--n-test", type=int, default=300)
    s.add_argument("--img-size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)

    s = verb("prepare", cmd_prepare, "build vocabulary, encoded labels and references from a Karpathy JSON")
    s.add_argument("--dataset-json", required=True)
    s.add_argument("--image-root", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--word-count-threshold", type=int, default=5)
    s.add_argument("--max-length", type=int, default=16)

    s = verb("encoder", cmd_encoder, "make an encoder's weights: from a file, a package, or in-domain pretraining")
    s.add_argument("--timm-name", required=True)
    s.add_argument("--img-size", type=int, default=128)
    s.add_argument("--weights", default="pretrain",
                   help="pretrain | random | efficientnet-lite0 | path to .safetensors/.pth")
    s.add_argument("--objects", help="objects.json (for --weights pretrain)")
    s.add_argument("--prepared", help="prepared-captions directory (for --weights pretrain)")
    s.add_argument("--pretrain", type=_json_arg, default={}, help="pretraining settings as JSON")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)
    s.add_argument("--log-json")

    s = verb("extract", cmd_extract, "extract grid + pooled features of every image into HDF5")
    s.add_argument("--encoder", required=True)
    s.add_argument("--prepared", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default="auto")

    s = verb("train", cmd_train, "train a decoder with cross-entropy on cached features")
    s.add_argument("--features", required=True)
    s.add_argument("--prepared", required=True)
    s.add_argument("--decoder", required=True, help="decoder architecture name, e.g. updown")
    s.add_argument("--decoder-config", type=_json_arg, default={})
    s.add_argument("--train-config", type=_json_arg, default={})
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)
    s.add_argument("--log-json")

    s = verb("scst", cmd_scst, "continue training a decoder with self-critical sequence training (CIDEr-D reward)")
    s.add_argument("--decoder", required=True, help="the cross-entropy checkpoint to start from")
    s.add_argument("--features", required=True)
    s.add_argument("--prepared", required=True)
    s.add_argument("--scst", type=_json_arg, default={}, help="SCST settings as JSON")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)
    s.add_argument("--log-json")

    s = verb("prune", cmd_prune, "prune a decoder to a ratio of zero weights, then fine-tune with the mask fixed")
    s.add_argument("--decoder", required=True, help="the trained decoder checkpoint to prune")
    s.add_argument("--features", required=True)
    s.add_argument("--prepared", required=True)
    s.add_argument("--method", default="global", choices=["global", "layerwise", "gradual"])
    s.add_argument("--ratio", type=float, required=True, help="fraction of the decoder's weights set to zero")
    s.add_argument("--finetune", type=_json_arg, default={}, help="fine-tuning settings as JSON")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)
    s.add_argument("--log-json")

    s = verb("pack", cmd_pack, "pack encoder + decoder + vocabulary into one .capz artifact")
    s.add_argument("--encoder", required=True)
    s.add_argument("--decoder", required=True)
    s.add_argument("--prepared", required=True)
    s.add_argument("--quantization", default="fp32", choices=["fp32", "fp16", "int8"])
    s.add_argument("--meta", type=_json_arg, default={}, help="what this variant is, as JSON")
    s.add_argument("--out", required=True)

    s = verb("evaluate", cmd_evaluate, "caption the raw test images from an artifact and score them")
    s.add_argument("--model", required=True)
    s.add_argument("--prepared", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--beam-size", type=int, default=3)
    s.add_argument("--latency-images", type=int, default=20,
                   help="test images timed for latency_ms; 0 leaves it to the latency verb")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--spice", default="auto", choices=["auto", "on", "off"])
    s.add_argument("--device", default="auto")
    s.add_argument("--meta", type=_json_arg, default={})

    s = verb("latency", cmd_latency, "time artifacts one after another (batch 1, raw test images)")
    s.add_argument("--models", nargs="+", required=True)
    s.add_argument("--prepared", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--images", type=int, default=20, help="test images timed per artifact")
    s.add_argument("--beam-size", type=int, default=3)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", required=True)

    s = verb("table", cmd_table, "collect metrics into results/table.csv, table.md and pareto.png")
    s.add_argument("--metrics", nargs="+", required=True)
    s.add_argument("--baselines", nargs="+", required=True,
                   help="per decoder, the variant its rows' changes are measured against")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--latency", help="JSON {variant: ms} from the latency verb")

    s = verb("caption", cmd_caption, "caption images with an artifact alone")
    s.add_argument("images", nargs="+")
    s.add_argument("--model", required=True)
    s.add_argument("--beam", type=int, default=3)
    s.add_argument("--json", action="store_true")
    s.add_argument("--device", default="auto")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .utils import offline_hub

    offline_hub()
    try:
        args.fn(args)
    except UserError as e:
        print(f"captioning {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"captioning {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0
