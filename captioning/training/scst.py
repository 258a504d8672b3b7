"""Self-critical sequence training (SCST, Rennie et al. 2017): fine-tune a decoder on CIDEr-D itself.

Cross-entropy teaches the next word of a human caption; the metric the paper reports is CIDEr-D
of whole generated captions. SCST closes that gap with REINFORCE: for every training image,
sample ``sample_n`` captions from the model (dropout on, as in training), score each with
CIDEr-D against the image's training references, and raise the log-probability of captions that
beat a baseline and lower it for those that do not:

    loss = -mean over samples of (reward - baseline) * sum_t log p(w_t)      (words + end token)

Baselines (``baseline``):

- ``greedy``: the reward of the model's own greedy caption, decoded in eval mode (the original
  "self-critical" baseline: only samples better than what the model would say at test time win);
- ``mean``: the mean reward of the image's *other* samples (leave-one-out; needs ``sample_n`` >= 2,
  costs no extra decoding).

The reward uses ``captioning.evaluation.cider.CiderD`` with document frequencies computed once
from all training references, which come from the prepared ``labels.h5`` (so they are tokenised,
truncated and UNK-ed exactly as the model's own words). Captions are compared as words only,
without an end-token symbol.

``sample_dropout`` (default on, as the reference implementation samples) keeps dropout on while
sampling. Off, the samples come from the model that will caption at test time, the one the
greedy baseline decodes: with heavy dropout (Up-Down's 0.5) the two differ most.

Everything else is the shared loop (``loop.fit``): Adam at a constant ``lr``, gradients clipped
by value, greedy val CIDEr-D after each epoch, the best epoch kept, the same kill-safety and
per-epoch seeding (sampling draws from its own generator, seeded from (seed, epoch) too).

``amp`` and ``pin_memory`` are the GPU options of ``captioning.training.xe`` (CUDA only; the
greedy baseline and the sampling run under autocast, the reward-weighted loss in fp32).

With ``keep_zeros`` (default) every parameter entry that is exactly zero in the starting
checkpoint (a pruned model's pruned weights) is held there by a ``compress.prune.FixedMask``,
so SCST cannot undo pruning.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..compress.prune import FixedMask, measured_sparsity
from ..errors import UserError
from ..evaluation.cider import CiderD
from ..models import read_decoder_meta
from ..models.search import greedy, sample
from ..utils import pick_device, seed_everything
from .amp import MixedPrecision
from .checkpoint import decoder_from_checkpoint, file_identity
from .loader import CaptionData
from .loop import Run, fit, open_data
from .validate import Validator

BASELINES = ("greedy", "mean")


# ---- reward --------------------------------------------------------------------------------------

def train_references(data: CaptionData) -> dict[int, list[str]]:
    """{image id: its training captions as words}, decoded from labels.h5 (train + restval images)."""
    refs = {}
    for r in data.index("train"):
        a, b = int(data.start[r]), int(data.end[r])
        if b <= a:
            raise UserError(f"image {int(data.ids[r])} has no captions in labels.h5")
        refs[int(data.ids[r])] = data.decode(data.labels[a:b])
    return refs


def leave_one_out_mean(reward: np.ndarray, n: int) -> np.ndarray:
    """Per sample, the mean reward of the other ``n - 1`` samples of the same image ([B*n] -> [B*n])."""
    r = reward.reshape(-1, n)
    return ((r.sum(1, keepdims=True) - r) / (n - 1)).reshape(-1)


def scst_loss(logprobs: torch.Tensor, reward: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """-(reward - baseline) * summed log-probability, averaged over samples.

    ``logprobs`` [R, T] are the sampled tokens' log-probabilities, 0 after the end token (as
    ``models.search.sample`` returns them); ``reward`` and ``baseline`` [R] carry no gradient.
    """
    return -((reward - baseline).detach() * logprobs.sum(1)).mean()


# ---- the step ------------------------------------------------------------------------------------

class SCSTStep:
    """Sample ``sample_n`` captions per image, reward each with CIDEr-D, weight its log-probability by
    (reward - baseline). Sampling draws from its own generator, seeded per epoch."""
    with_labels = False

    def __init__(self, mp: MixedPrecision, data: CaptionData, scorer: CiderD, sample_n: int, baseline: str,
                 max_length: int, device: str, sample_dropout: bool = True):
        self.mp, self.data, self.scorer, self.sample_n, self.baseline = mp, data, scorer, sample_n, baseline
        self.max_length, self.device, self.sample_dropout = max_length, device, sample_dropout
        self.sampler: torch.Generator | None = None

    def start_epoch(self, epoch_seed: int) -> None:
        self.sampler = torch.Generator(device=self.device).manual_seed(epoch_seed + 2)

    def __call__(self, decoder, b):
        n = self.sample_n
        if self.baseline == "greedy":
            decoder.eval()
            with torch.no_grad(), self.mp.autocast():
                best_guess = self.data.decode(greedy(decoder, b.fc, b.att, self.max_length).cpu())
            decoder.train()
            base = np.repeat(self.scorer.scores(b.ids, best_guess), n)
        decoder.train(self.sample_dropout)  # eval mode only switches dropout off: gradients still flow
        with self.mp.autocast():
            seq, logprobs = sample(decoder, b.fc, b.att, n, max_length=self.max_length, generator=self.sampler)
        decoder.train()
        logprobs = logprobs.float()
        reward = self.scorer.scores(np.repeat(b.ids, n).tolist(), self.data.decode(seq.cpu()))
        if self.baseline == "mean":
            base = leave_one_out_mean(reward, n)
        loss = scst_loss(logprobs, torch.from_numpy(reward).to(logprobs), torch.from_numpy(base).to(logprobs))
        return loss, {"loss": loss.item(), "reward": float(reward.mean()), "baseline": float(base.mean())}


# ---- training ------------------------------------------------------------------------------------

def train_scst(init_from, features_h5, prepared_dir, out_path, epochs: int = 2, batch_size: int = 50,
               lr: float = 2e-5, sample_n: int = 5, baseline: str = "greedy", max_length: int | None = None,
               seed: int = 0, device: str = "auto", log_json=None, grad_clip: float = 0.1, keep_zeros: bool = True,
               keep_resume: bool = False, progress: bool = True, amp: bool = False, pin_memory: bool = False,
               features: str = "auto", memory_limit_mb: int = 4000, workers: int = 2,
               sample_dropout: bool = True) -> dict:
    """Fine-tune the decoder at ``init_from`` with SCST; write its best val CIDEr-D epoch to ``out_path``.

    Returns ``loop.fit``'s report plus "init_val_cider" (the starting checkpoint's own recorded val
    score, if any); history rows hold "loss", "reward" (mean sampled reward), "baseline" (mean
    baseline) and, when ``keep_zeros`` holds zeros, "sparsity". ``max_length`` defaults to the prepared data's.
    ``keep_resume``, ``amp``, ``pin_memory``, ``features``, ``memory_limit_mb``, ``workers``: as in ``train_xe``.
    """
    if baseline not in BASELINES:
        raise UserError(f"unknown SCST baseline {baseline!r}; known: {', '.join(BASELINES)}")
    if sample_n < 1 or (baseline == "mean" and sample_n < 2):
        raise UserError(f"sample_n {sample_n}: need at least {2 if baseline == 'mean' else 1} samples per image"
                        + (" for the 'mean' baseline" if baseline == "mean" else ""))
    device = pick_device(device)
    data = open_data(features_h5, prepared_dir, 1, features, memory_limit_mb, workers)
    max_length = max_length or data.max_length
    scorer = CiderD(train_references(data))

    seed_everything(seed)
    init_meta = read_decoder_meta(init_from)
    decoder = decoder_from_checkpoint(init_from, None, {}, data, device)
    mask = FixedMask.from_zeros(decoder) if keep_zeros else None
    mask = mask if mask is not None and mask.masks else None  # a dense decoder has no zeros to hold
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    mp = MixedPrecision(amp, device, "scst")
    init = file_identity(init_from)
    settings = {
        "stage": "scst", "decoder": decoder.config, "init_from": init, "batch_size": batch_size, "lr": lr,
        "sample_n": sample_n, "baseline": baseline, "max_length": max_length, "seed": seed, "grad_clip": grad_clip,
        "grad_clip_mode": "value", "keep_zeros": keep_zeros, "data": data.fingerprint(),
    }
    gpu_options = {k: True for k, v in (("amp", amp), ("pin_memory", pin_memory)) if v}
    settings.update(gpu_options)  # only when set, so existing resume files keep matching
    if not sample_dropout:
        settings["sample_dropout"] = False

    def checkpoint_meta(epoch: int, val_cider: float, sparsity: dict | None) -> dict:
        meta = {k: v for k, v in init_meta.items() if k not in ("format", "config", "amp", "pin_memory")}
        meta.update(gpu_options)
        meta.update(stage="scst", baseline=baseline, sample_n=sample_n, epoch=epoch, val_cider=val_cider,
                    init_val_cider=init_meta.get("val_cider"), init_from={"path": str(init_from), **init})
        if "sparsity" in init_meta:
            meta.update(measured_sparsity(decoder))
        return meta

    run = Run(stage="scst", out_path=Path(out_path), settings=settings, epochs=epochs, batch_size=batch_size,
              seed=seed, lr_at=lambda epoch: lr, grad_clip=grad_clip, device=device, pin_memory=pin_memory,
              log_json=log_json, keep_resume=keep_resume, progress=progress,
              report_extra={"init_val_cider": init_meta.get("val_cider")})
    step = SCSTStep(mp, data, scorer, sample_n, baseline, max_length, device, sample_dropout)
    validator = Validator(data, prepared_dir, 1, max_length, batch_size, device, pin_memory, progress)
    return fit(run, decoder, optimizer, data, step, validator, mp, mask, checkpoint_meta)
