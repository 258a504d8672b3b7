"""A whole captioning model: raw image -> encoder -> decoder -> words.

This is what evaluation times and what an artifact loads into, so encoder
changes and compression count in every number the table reports.

The caption length limit (``max_length``) travels with the data: ``pack_variant`` takes it from the
prepared dataset's ``vocab.json`` (``max_length``), the artifact stores it (config key ``max_len``,
kept from the first artifacts so they still load)
and ``load_captioner`` reads it back; there is no default.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .compress import artifact
from .compress.quantize import QUANT_MODES, check_mode, encoding_for, roundtrip
from .data.images import encoder_images
from .encoders import create_encoder, load_encoder
from .errors import UserError
from .models import create_decoder, load_decoder
from .timing import model_work
from .utils import caption_in_batches, pick_device


class Captioner:
    def __init__(self, encoder, decoder, itow: dict[int, str], max_length: int, device: str = "cpu"):
        self.encoder = encoder.eval().to(device)
        self.decoder = decoder.eval().to(device)
        self.itow = itow
        self.max_length = max_length
        self.device = device
        self.quantization = "fp32"
        self.source = "captioner"  # what error messages name: the artifact's path once loaded from one

    def parameters(self):
        yield from self.encoder.parameters()
        yield from self.decoder.parameters()

    def state_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"encoder": state dict, "decoder": state dict} of float tensors (an int8 model's on its grid)."""
        return {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict()}

    runtime = "torch"

    def images(self, paths) -> torch.Tensor:
        return encoder_images(self.encoder, paths)

    def cpu(self) -> Captioner:
        """This captioner on CPU (where latency is measured)."""
        self.encoder, self.decoder, self.device = self.encoder.cpu(), self.decoder.cpu(), "cpu"
        return self

    @torch.no_grad()
    def caption_images(self, images: torch.Tensor, beam_size: int = 3) -> list[str]:
        fc, att = self.encoder(images.to(self.device))
        return self.caption_features(fc, att, beam_size)

    @torch.no_grad()
    def caption_features(self, fc: torch.Tensor, att: torch.Tensor, beam_size: int = 3) -> list[str]:
        """Captions from the encoder's outputs (``evaluation.encoded`` caches them across variants)."""
        from .data.prepare import decode
        from .models.search import beam_search

        fc, att = fc.to(self.device), att.to(self.device)
        if not (torch.isfinite(fc).all() and torch.isfinite(att).all()):  # weights out of any trained range
            raise UserError(f"{self.source}: the model's activations overflow float32, so it cannot caption")
        seq = beam_search(self.decoder, fc, att, beam_size=beam_size, max_length=self.max_length)
        return [decode(self.itow, s) for s in seq.tolist()]

    def caption_files(self, paths, beam_size: int = 3, batch_size: int = 16) -> list[str]:
        return caption_in_batches(self, paths, beam_size, batch_size)


def _build(encoder_config: dict, decoder_config: dict, groups, itow, max_length: int, mode: str,
           device: str, source: str) -> Captioner:
    """A Captioner from configs and stored (decoded) weights, computing in ``mode``.

    Shared by ``load_captioner`` and ``quantize_captioner`` so both give the same model.
    """
    encoder, decoder = _modules(encoder_config, decoder_config, source)
    for group, module in (("encoder", encoder), ("decoder", decoder)):
        try:
            module.load_state_dict(groups[group])
        except (KeyError, RuntimeError) as e:
            lines = str(e).strip().splitlines()
            raise UserError(f"{source}: {group} weights do not match its config ({' '.join(lines[:2])})") from None
    cap = Captioner(encoder, decoder, itow, max_length, device)
    cap.quantization = mode
    return cap


def quantize_captioner(captioner: Captioner, mode: str) -> Captioner:
    """A new Captioner holding exactly what ``pack_model(..., quantization=mode)`` then
    ``load_captioner`` would give: same weights, same runtime, hence the same captions."""
    check_mode(mode)
    held = captioner.state_groups()
    groups = roundtrip(stored_groups(captioner.encoder, held["decoder"], held["encoder"]), mode)
    return _build(captioner.encoder.config(), captioner.decoder.config, groups, captioner.itow,
                  captioner.max_length, mode, captioner.device, "captioner")


MAX_CAPTION_LENGTH = 1000  # words; COCO captions are cut at 16


def _max_length(value, where: str, key: str) -> int:
    """A caption length limit (given, or read from a file): an integer in [1, MAX_CAPTION_LENGTH],
    else a one-line UserError."""
    if value is None:
        raise UserError(f"{where}: no '{key}' (the caption length limit)")
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CAPTION_LENGTH:
        raise UserError(f"{where}: '{key}' must be an integer >= 1 and <= {MAX_CAPTION_LENGTH}, got {value!r}")
    return value


RUNTIMES = ("torch", "onnxruntime")


def stored_groups(encoder, decoder_state: dict, encoder_state: dict | None = None) -> dict:
    """The float tensors an artifact stores: the encoder's (default: its own) with each batch norm
    folded into its convolution (``compress.fold``), and ``decoder_state`` as it is."""
    from .compress.fold import folded_state

    sample = torch.randn(1, 3, encoder.img_size, encoder.img_size, generator=torch.Generator().manual_seed(0))
    return {"encoder": folded_state(encoder, sample, encoder_state), "decoder": decoder_state}


def check_runtime(runtime: str, mode: str) -> str:
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and mode == "fp16":
        raise UserError("fp16 does not run on ONNX Runtime's CPU kernels: use fp32 or int8 there")
    return runtime


def pack_model(out, encoder, decoder, itow: dict[int, str], max_length: int,
               extra: dict | None = None, quantization: str = "fp32", runtime: str = "torch",
               calibration: torch.Tensor | None = None, groups: dict | None = None, calibration_cache=None) -> int:
    """Write encoder + decoder + vocabulary + caption length limit as one artifact, tensors stored
    per ``quantization`` (see ``compress.quantize``) after the encoder's batch norms are folded
    (``stored_groups``); returns its size in bytes.

    ``runtime`` is the engine the artifact runs on by default. The stored tensors are the same for
    both: an ONNX Runtime artifact is rebuilt into ONNX graphs at load, which keeps the file as small
    as a torch one. For int8 on ONNX Runtime the encoder's activations are quantized statically, so
    their ranges, calibrated here on ``calibration`` images (as ``encoder_images`` gives them), are
    stored in the config (``runtime.encoder_ranges``), with the encoder units where int8 would cost
    most, which stay float (``runtime.encoder_float``; ``ort_quantize.float_units``). ``groups``:
    what ``stored_groups`` gives for these modules, when the caller has it already (folding runs a
    forward pass). ``calibration_cache``: a folder where packs of the same encoder share that
    calibration.
    """
    mode, max_length = check_mode(quantization), _max_length(max_length, str(out), "max_length")
    check_runtime(runtime, mode)
    groups = groups or stored_groups(encoder, decoder.state_dict())
    rt = {"quantization": mode, "engine": runtime}
    if (runtime, mode) == ("onnxruntime", "int8"):
        if calibration is None or len(calibration) == 0:
            raise UserError(f"{out}: int8 on ONNX Runtime needs calibration images (--calibration-images)")
        rt["encoder_ranges"], rt["encoder_float"] = _encoder_calibration(encoder, roundtrip(groups, mode)["encoder"],
                                                                         calibration, calibration_cache)
    config = {"encoder": encoder.config(), "decoder": decoder.config,
              "vocab": {str(k): v for k, v in itow.items()}, "max_len": max_length,
              **(extra or {}), "runtime": rt}
    return artifact.pack(out, groups, config, lambda g, n, t: encoding_for(mode, g, n, t))


def _encoder_calibration(encoder, stored: dict[str, torch.Tensor], images: torch.Tensor,
                         cache_dir=None) -> tuple[dict, list]:
    """The activation ranges of the encoder as it will run (its weights as the artifact stores them),
    and the units it keeps in float (``ort_quantize.calibrate``, cached in ``cache_dir``)."""
    from .deploy.onnx_export import export_encoder
    from .deploy.ort_quantize import calibrate

    c = encoder.config()
    as_stored = create_encoder(c["timm_name"], img_size=c["img_size"], mean=c["mean"], std=c["std"])
    as_stored.load_state_dict(stored)
    return calibrate(export_encoder(as_stored.eval()), images.numpy(), cache_dir)


@model_work
def pack_variant(out, encoder_path, decoder_path, prepared_dir, quantization: str = "fp32",
                 meta: dict | None = None, runtime: str = "torch", calibration_images: int = 0,
                 calibration_cache=None) -> tuple[int, dict]:
    """Pack an encoder file and a decoder file with the prepared dataset's vocabulary and
    ``max_length`` into the artifact ``out``; returns (its size in bytes, its storage record).

    The artifact's config also holds ``variant`` (``meta``: what this variant is) and ``storage``:
    the decoder's measured sparsity and the theoretical storage floor for ``quantization``.
    ``calibration_images``: the first that many training images calibrate an int8 ONNX Runtime encoder
    (once per encoder with ``calibration_cache``: see ``pack_model``).
    """
    from .compress.prune import measured_sparsity
    from .compress.quantize import storage_floor_bytes
    from .data.prepare import load_vocab
    from .io import read_json

    encoder, decoder = load_encoder(encoder_path), load_decoder(decoder_path)
    groups = stored_groups(encoder, decoder.state_dict())
    storage = {**measured_sparsity(decoder), "floor_bytes": storage_floor_bytes(groups, quantization)}
    itow, vocab_json = load_vocab(prepared_dir), Path(prepared_dir) / "vocab.json"
    max_length = _max_length(read_json(vocab_json).get("max_length"), str(vocab_json), "max_length")
    calibration = None
    if calibration_images > 0 and (runtime, quantization) == ("onnxruntime", "int8"):
        from .data.prepare import split_images

        calibration = encoder_images(encoder, split_images(prepared_dir, "train")[1][:calibration_images])
    size = pack_model(out, encoder, decoder, itow, max_length=max_length,
                      extra={"variant": meta or {}, "storage": storage}, quantization=quantization,
                      runtime=runtime, calibration=calibration, groups=groups, calibration_cache=calibration_cache)
    return size, storage


def load_captioner(path: str | Path, device: str = "cpu", runtime: str | None = None, threads: int = 1):
    """Rebuild a Captioner from an artifact alone: no dataset, config or network needed.

    ``device`` "auto" means CUDA when present; on torch every quantization computes in float, so
    any artifact runs on any device (``compress.quantize``). ``runtime`` (torch or onnxruntime)
    overrides the engine the artifact was packed for; ONNX Runtime gets an ``OrtCaptioner`` on CPU
    with ``threads`` threads.

    The artifact may come from a stranger: its configs are checked against bounds and its model is
    first built on the meta device (no memory) and compared with the stored tensors, so a config
    that asks for more than the file holds fails with one line before anything is allocated.
    """
    device = pick_device(device)
    config, groups = artifact.read(path)
    where = str(path)
    encoder_config, decoder_config = config.get("encoder"), config.get("decoder")
    if not isinstance(encoder_config, dict) or not isinstance(decoder_config, dict):
        raise UserError(f"{where}: artifact config is incomplete or malformed (needs 'encoder' and 'decoder' objects)")
    rt = config.get("runtime", {})
    mode = rt.get("quantization", "fp32") if isinstance(rt, dict) else None
    if not isinstance(mode, str) or mode not in QUANT_MODES:
        raise UserError(f"{where}: unknown quantization {mode!r} (known: {', '.join(QUANT_MODES)})")
    engine = runtime or rt.get("engine", "torch")
    if not isinstance(engine, str) or engine not in RUNTIMES:
        raise UserError(f"{where}: unknown runtime {engine!r} (known: {', '.join(RUNTIMES)})")
    max_length = _max_length(config.get("max_len"), where, "max_len")
    _check_fits(encoder_config, decoder_config, groups, where)
    itow = _vocabulary(config.get("vocab"), decoder_config["vocab_size"], where)
    if engine == "onnxruntime":
        from .deploy.ort_search import OrtCaptioner

        # the stored weights in float: the ONNX graphs are exported from them, then quantized there
        cap = _build(encoder_config, decoder_config, groups, itow, max_length, "fp32", "cpu", where)
        cap.config, cap.source = config, where
        return OrtCaptioner.from_artifact(cap, mode, rt.get("encoder_ranges"), threads, rt.get("encoder_float", []))
    cap = _build(encoder_config, decoder_config, groups, itow, max_length, mode, device, where)
    cap.config, cap.source = config, where
    return cap


def _vocabulary(vocab, vocab_size: int, where: str) -> dict[int, str]:
    """index -> word of an artifact: exactly the words 1..vocab_size the decoder can emit, as strings."""
    if not isinstance(vocab, dict):
        raise UserError(f"{where}: artifact config is incomplete or malformed (no 'vocab' object)")
    try:
        itow = {int(k): v for k, v in vocab.items()}
    except ValueError:
        raise UserError(f"{where}: vocab keys must be word indices (integers)") from None
    if set(itow) != set(range(1, vocab_size + 1)) or not all(isinstance(w, str) for w in itow.values()):
        raise UserError(f"{where}: vocab must map each index 1..{vocab_size} (the decoder's words) to a string")
    return itow


def _check_fits(encoder_config: dict, decoder_config: dict, groups, where: str) -> None:
    """UserError unless the configs describe exactly the stored tensors (names and shapes).

    The model is built on the meta device, so even a config asking for billions of weights costs
    nothing here; the real model is built only once it is known to be as large as the file's tensors.
    """
    with torch.device("meta"):
        encoder, decoder = _modules(encoder_config, decoder_config, where)
    if decoder.config["feat_dim"] != encoder.feat_dim:
        raise UserError(f"{where}: decoder feat_dim {decoder.config['feat_dim']} does not match the encoder's "
                        f"{encoder.feat_dim} features")
    if set(groups) != {"encoder", "decoder"}:
        raise UserError(f"{where}: artifact holds tensor groups {sorted(groups)}, not encoder and decoder")
    for group, module in (("encoder", encoder), ("decoder", decoder)):
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in groups[group].items()}
        if want != have:
            diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
            raise UserError(f"{where}: {group} weights do not match its config "
                            f"({len(diff)} tensors differ, e.g. {diff[0]})")


def _modules(encoder_config: dict, decoder_config: dict, where: str):
    """(encoder, decoder) built from their configs, on whatever device is current."""
    try:
        encoder = create_encoder(encoder_config["timm_name"], img_size=encoder_config["img_size"],
                                 mean=encoder_config["mean"], std=encoder_config["std"])
        decoder = create_decoder(**decoder_config)
    except (KeyError, TypeError) as e:
        raise UserError(f"{where}: model config is incomplete ({type(e).__name__}: {e})") from None
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return encoder, decoder
