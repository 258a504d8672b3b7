"""Cross-entropy ("XE") training with teacher forcing, as the reference trains its first stage.

One epoch is: shuffled batches of images with ``seq_per_img`` captions each, Adam, gradients
clipped by value (0.1, the reference's default mode), then greedy (or beam) decoding of the val
split scored with CIDEr-D; the best epoch is kept (the loop is ``loop.fit``).

Learning rate: ``lr * lr_decay_rate ** (epoch // lr_decay_every)`` (0-based epochs), the
reference's step decay.

The same entry point also fine-tunes: ``init_from`` starts from a saved decoder (rebuilt from the
checkpoint's own config), a ``Pruner`` holds pruned weights at zero (see ``finetune``), and a
``teacher`` mixes in distillation (see ``distill``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models import create_decoder
from ..utils import pick_device, seed_everything
from .amp import MixedPrecision
from .checkpoint import decoder_from_checkpoint, file_identity
from .distill import DistillStep, Teacher
from .loop import Run, fit, open_data
from .validate import Validator


def sequence_loss(logprobs: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per predicted token, end token included, padding excluded.

    ``logprobs`` [R, T+1, V+1] comes from ``CaptionDecoder.forward(fc, att, seq)`` with ``seq`` [R, T].
    Position t is counted when t == 0 or ``seq[:, t-1]`` is a word, i.e. every word and the first 0.
    """
    target = F.pad(seq, (0, 1))                                         # [R, T+1], end token last
    mask = torch.cat([seq.new_ones(seq.shape[0], 1), seq > 0], 1).to(logprobs.dtype)
    nll = -logprobs.gather(2, target.unsqueeze(2)).squeeze(2)
    return (nll * mask).sum() / mask.sum()


def lr_at(epoch: int, lr: float, every: int, rate: float) -> float:
    return lr * rate ** (epoch // every) if every and every > 0 else lr


class XEStep:
    """Teacher-forced cross-entropy of a batch's reference captions."""
    with_labels = True

    def __init__(self, mp: MixedPrecision):
        self.mp = mp

    def start_epoch(self, epoch_seed: int) -> None:
        pass

    def __call__(self, decoder, b):
        with self.mp.autocast():
            logprobs = decoder(b.fc, b.att, b.labels).float()
        loss = sequence_loss(logprobs, b.labels)
        return loss, {"loss": loss.item()}


def train_xe(features_h5, prepared_dir, out_path, decoder_name: str | None, decoder_cfg: dict | None = None,
             epochs: int = 5, batch_size: int = 50, lr: float = 5e-4, lr_decay_every: int = 3,
             lr_decay_rate: float = 0.8, grad_clip: float = 0.1, seq_per_img: int = 5, beam_size: int = 1,
             max_length: int | None = None, seed: int = 0, device: str = "auto", log_json=None,
             keep_resume: bool = False, progress: bool = True, init_from: str | Path | None = None,
             pruner=None, stage: str = "xe", teacher: str | Path | None = None,
             teacher_features: str | Path | None = None, kd_weight: float = 0.5, kd_temperature: float = 1.0,
             kd_mode: str = "word", amp: bool = False, pin_memory: bool = False, patience: int | None = None,
             features: str = "auto", memory_limit_mb: int = 4000, workers: int = 2) -> dict:
    """Train a decoder with cross-entropy; write the best val CIDEr-D epoch to ``out_path`` at the end.

    Returns ``loop.fit``'s report; history rows hold "loss" (plus "kd_loss" with a teacher and
    "sparsity" with a pruner). ``max_length`` (validation decoding) defaults to the prepared data's.

    ``init_from``: a decoder file to start from; its config is used, and ``decoder_name`` may be
    None. ``pruner``: a ``compress.prune.Pruner`` whose masks hold throughout. ``stage`` is written
    into the checkpoint's metadata. The settings (for resume matching) name the init file by its
    sha256 and the pruner by ``describe()``.

    ``teacher`` + ``teacher_features``: distil from that frozen decoder over those features (same
    images, same order as ``features_h5``); see ``distill.DistillStep``. ``kd_mode``: "word" (the KL
    to its word distributions) or "sequence" (its beam-search captions as extra targets).

    ``amp``: fp16 mixed precision on CUDA (``amp.MixedPrecision``); ``pin_memory``: pinned,
    asynchronous host-to-GPU copies (``loader.to_device``). Both are no-ops on a CPU; set, they
    enter the settings and the checkpoint's metadata.

    ``features`` ("auto", "memory", "stream"), ``memory_limit_mb``, ``workers``: how features are
    read (``loop.open_data``); not settings, since batches are the same either way.

    ``patience``: stop once that many epochs in a row did not raise val CIDEr-D (``epochs`` is then
    the most it trains), so a reference is trained to its plateau.

    ``keep_resume``: keep the resume and best files (``checkpoint.run_files``) after the end, so a
    finished run can be extended (``epochs`` is not part of the settings).
    """
    if patience is not None and patience < 1:
        raise UserError(f"patience must be at least 1 epoch, got {patience}")
    device = pick_device(device)
    decoder_cfg = dict(decoder_cfg or {})
    clash = sorted({"name", "vocab_size", "feat_dim"} & set(decoder_cfg))
    if clash:
        raise UserError(f"decoder config: {', '.join(clash)} come from the data and the decoder name; remove them")
    data = open_data(features_h5, prepared_dir, seq_per_img, features, memory_limit_mb, workers)
    max_length = max_length or data.max_length
    kd = None
    if teacher is not None or teacher_features is not None:
        if teacher is None or teacher_features is None:
            raise UserError("knowledge distillation needs both a teacher checkpoint and the teacher's features file")
        if not 0 <= kd_weight <= 1 or kd_temperature <= 0:
            raise UserError(f"kd_weight must be in [0, 1] and kd_temperature > 0, got {kd_weight} and {kd_temperature}")
        kd = Teacher(teacher, teacher_features, data, features_h5, device, pin_memory, features, memory_limit_mb)

    seed_everything(seed)
    if init_from is not None:
        decoder = decoder_from_checkpoint(init_from, decoder_name, decoder_cfg, data, device)
    elif not decoder_name:
        raise UserError("no decoder name given, and no checkpoint to start from (init_from)")
    else:
        decoder = create_decoder(decoder_name, data.vocab_size, data.feat_dim, **decoder_cfg).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    mp = MixedPrecision(amp, device, stage)

    settings = {
        "decoder": decoder.config, "batch_size": batch_size, "lr": lr, "lr_decay_every": lr_decay_every,
        "lr_decay_rate": lr_decay_rate, "grad_clip": grad_clip, "grad_clip_mode": "value",
        "seq_per_img": seq_per_img, "beam_size": beam_size, "max_length": max_length, "seed": seed,
        "data": data.fingerprint(),
    }
    # each only when used, so plain XE resume files keep matching
    if stage != "xe":
        settings["stage"] = stage
    if init_from is not None:
        settings["init_from"] = file_identity(init_from)
    if pruner is not None:
        settings["pruner"] = pruner.describe()
    if kd is not None:
        settings["kd"] = {"teacher_sha256": file_identity(teacher)["sha256"], "teacher_features": kd.fingerprint(),
                          "kd_weight": kd_weight, "kd_temperature": kd_temperature}
        if kd_mode != "word":  # only when used, so word-level resume files keep matching
            settings["kd"]["kd_mode"] = kd_mode
    gpu_options = {k: True for k, v in (("amp", amp), ("pin_memory", pin_memory)) if v}
    settings.update(gpu_options)

    def checkpoint_meta(epoch: int, val_cider: float, sparsity: dict | None) -> dict:
        meta = {"stage": stage, "vocab_size": data.vocab_size, "feat_dim": data.feat_dim, "epoch": epoch,
                "val_cider": val_cider, "itow": data.itow_json(), **gpu_options}
        if init_from is not None:
            meta["init_from"] = {"path": str(init_from), **settings["init_from"]}
        if pruner is not None:
            meta.update(sparsity, prune_method=pruner.method, prune_ratio=pruner.ratio)
        if kd is not None:
            meta.update(teacher={"path": str(teacher), "sha256": settings["kd"]["teacher_sha256"]},
                        kd_weight=kd_weight, kd_temperature=kd_temperature, kd_mode=kd_mode)
        return meta

    run = Run(stage=stage, out_path=Path(out_path), settings=settings, epochs=epochs, batch_size=batch_size,
              seed=seed, lr_at=lambda epoch: lr_at(epoch, lr, lr_decay_every, lr_decay_rate), grad_clip=grad_clip,
              device=device, pin_memory=pin_memory, log_json=log_json, keep_resume=keep_resume, progress=progress,
              patience=patience)
    step = XEStep(mp) if kd is None else DistillStep(mp, kd, kd_weight, kd_temperature, sequence_loss, kd_mode,
                                                    max_length)
    validator = Validator(data, prepared_dir, beam_size, max_length, batch_size, device, pin_memory, progress)
    return fit(run, decoder, optimizer, data, step, validator, mp, pruner, checkpoint_meta)
