"""The one training loop every stage runs: ``fit``.

A stage (cross-entropy, distillation, SCST, pruned fine-tuning) brings three things:

- a *step*: the loss of one batch and the numbers an epoch averages (``Step``);
- optionally a *mask* hook that holds weights at zero (``compress.prune.Pruner``, or
  ``FixedMask`` for SCST of a pruned model);
- what its kept checkpoint records (``checkpoint_meta``).

``fit`` does the rest, the same way for all of them, top to bottom: resume a killed run,
re-seed each epoch, set the learning rate, step through shuffled batches, validate (val
CIDEr-D), keep the best eligible epoch, write the resume file and the log, publish the best
epoch at the end (see ``checkpoint`` for the kill-safe files).

Determinism: all randomness of an epoch (shuffling, caption choice, dropout, a stage's own
sampling) is seeded from (seed, epoch) rather than carried over, so a resumed run ends with the
same weights as an uninterrupted one.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from ..compress.prune import measured_sparsity
from ..errors import UserError
from ..io import write_json
from ..models import CaptionDecoder, save_decoder
from ..timing import model_work
from .amp import MixedPrecision, optimizer_step
from .checkpoint import finish, resume_if_possible, run_files, save_resume
from .loader import Batch, CaptionData, to_device
from .validate import Validator


class Step(Protocol):
    """One stage's objective. ``with_labels``: whether batches carry reference captions."""
    with_labels: bool

    def start_epoch(self, epoch_seed: int) -> None:
        """Seed the step's own randomness (e.g. SCST's sampling) for an epoch."""

    def __call__(self, decoder: CaptionDecoder, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to minimise, {name: number} averaged over the epoch into its history row)."""


@dataclass
class Run:
    """Where a run writes and how it steps; ``settings`` is what a resume file must match."""
    stage: str                        # "xe", "prune", "scst", ...: in messages and checkpoints
    out_path: Path
    settings: dict
    epochs: int
    batch_size: int
    seed: int
    lr_at: Callable[[int], float]     # 0-based epoch -> learning rate
    grad_clip: float                  # by value; <= 0 disables clipping
    device: str = "cpu"
    pin_memory: bool = False
    log_json: str | Path | None = None
    keep_resume: bool = False
    progress: bool = True
    patience: int | None = None       # stop once this many epochs pass without a better val CIDEr-D
    report_extra: dict = field(default_factory=dict)   # stage-specific keys of the returned report


def trim_padding(seq: torch.Tensor) -> torch.Tensor:
    """Drop the all-zero columns at the end of a 0-padded batch (saves decoder steps)."""
    n = int((seq > 0).sum(1).max()) if seq.numel() else 0
    return seq[:, :max(n, 1)]


def open_data(features_h5, prepared_dir, seq_per_img: int, features: str = "auto", memory_limit_mb: int = 4000,
              workers: int = 2) -> CaptionData:
    """The training data; a run needs images to train on and to validate with.

    ``features`` ("auto", "memory", "stream"), ``memory_limit_mb`` and ``workers``: how features are
    read (``loader.CaptionData``); the choice is logged on stderr. They are not training settings:
    batches are the same either way, so a resumed run may read another way.
    """
    data = CaptionData(features_h5, prepared_dir, seq_per_img, features, memory_limit_mb, workers)
    if len(data.index("train")) == 0 or len(data.index("val")) == 0:
        raise UserError(f"{Path(prepared_dir) / 'images.json'}: needs images in both the train and val splits")
    return data


@model_work
def fit(run: Run, decoder: CaptionDecoder, optimizer: torch.optim.Optimizer, data: CaptionData, step: Step,
        validator: Validator, mp: MixedPrecision, mask=None,
        checkpoint_meta: Callable[[int, float, dict | None], dict] = lambda epoch, val, sparsity: {}) -> dict:
    """Train ``decoder`` for ``run.epochs``; write its best val CIDEr-D epoch to ``run.out_path`` at the end.

    Returns (and writes to ``run.log_json`` after every epoch) {"settings", "history", "best_epoch",
    "best_val_cider", **run.report_extra, "out_path"}. History rows are {"epoch" (1-based), "lr",
    the step's numbers, "val_cider", "seconds"}, plus "sparsity" with a mask. With a mask only
    epochs at its final sparsity (``mask.at_target``) may be kept; if none was, nothing is written.
    ``checkpoint_meta(epoch, val_cider, sparsity)`` gives the kept checkpoint's metadata.
    With ``run.patience``, training stops early once that many epochs in a row did not beat the best
    one (``run.epochs`` is then the most it runs); the decision is read from the history, so a
    resumed run stops where the uninterrupted one did.
    """
    resume_path, best_path = run_files(run.out_path)
    start, history, best_cider, best_epoch = 0, [], float("-inf"), 0
    stop = {"epochs": run.epochs, "patience": run.patience}
    resumed = resume_if_possible(run.stage, run.out_path, run.settings, stop, decoder, optimizer, mp, mask)
    if resumed is not None:
        start, history = int(resumed["epoch"]), list(resumed["history"])
        best_cider, best_epoch = float(resumed["best_val_cider"]), int(resumed["best_epoch"])

    def report() -> dict:
        return {"settings": run.settings, "history": history, "best_epoch": best_epoch,
                "best_val_cider": best_cider if best_epoch else None, **run.report_extra,
                "out_path": str(run.out_path)}

    for epoch in range(start, run.epochs):
        if run.patience and best_epoch and epoch - best_epoch >= run.patience:
            print(f"{run.stage}: val CIDEr-D has not improved for {epoch - best_epoch} epochs since epoch "
                  f"{best_epoch}; stopping", file=sys.stderr)
            break
        t0 = time.time()
        epoch_seed = run.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)                        # dropout
        gen = torch.Generator().manual_seed(epoch_seed + 1)  # shuffling and caption choice
        step.start_epoch(epoch_seed)
        lr = run.lr_at(epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        steps = data.num_batches("train", run.batch_size)
        if mask is not None:
            mask.on_epoch_start(decoder, epoch, steps)

        decoder.train()
        sums: dict[str, float] = {}
        n = 0
        batches = data.batches("train", run.batch_size, shuffle=True, generator=gen, with_labels=step.with_labels)
        bar = tqdm(batches, total=steps, desc=f"{run.stage} epoch {epoch + 1}/{run.epochs}",
                   file=sys.stderr, disable=not run.progress, leave=False)
        for i, b in enumerate(bar):
            if mask is not None:
                mask.on_step(decoder, epoch, i, steps)
            if step.with_labels:
                b.labels = trim_padding(b.labels)  # on the host: finding the length needs no GPU sync
            loss, numbers = step(decoder, to_device(b, run.device, run.pin_memory))
            optimizer_step(loss, decoder, optimizer, mp.scaler, run.grad_clip,
                           mask.before_step if mask is not None else None,
                           mask.after_step if mask is not None else None)
            n += 1
            for k, v in numbers.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v / n:.3f}" for k, v in sums.items()})

        val_cider = validator.score(decoder)
        means = {k: v / max(n, 1) for k, v in sums.items()}
        row = {"epoch": epoch + 1, "lr": lr, **means, "val_cider": val_cider, "seconds": round(time.time() - t0, 3)}
        sparsity = measured_sparsity(decoder) if mask is not None else None
        if sparsity is not None:
            row["sparsity"] = sparsity["sparsity"]
        history.append(row)
        print(f"{run.stage} epoch {epoch + 1}/{run.epochs}: " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
              + f"  val CIDEr-D {val_cider:.4f}  " + (f"sparsity {sparsity['sparsity']:.4f}  " if sparsity else "")
              + f"({time.time() - t0:.1f} s)", file=sys.stderr)

        if (mask is None or mask.at_target(epoch)) and val_cider > best_cider:
            best_cider, best_epoch = val_cider, epoch + 1
            save_decoder(decoder, best_path, checkpoint_meta(epoch + 1, val_cider, sparsity))
        save_resume(resume_path, decoder, optimizer, {
            "settings": run.settings, "epoch": epoch + 1, "history": history,
            "best_val_cider": best_cider, "best_epoch": best_epoch,
            **({"amp_scaler": mp.state()} if mp.active else {}),
        }, mask)
        if run.log_json:
            write_json(run.log_json, report())

    finish(run.out_path, best_epoch, run.keep_resume, {
        "settings": run.settings, "epoch": history[-1]["epoch"] if history else 0, "history": history,
        "best_val_cider": best_cider, "best_epoch": best_epoch, "stop": stop})
    if run.log_json:
        write_json(run.log_json, report())
    return report()
