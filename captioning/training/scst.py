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

Everything else follows ``captioning.training.xe``: Adam at a constant ``lr``, gradients clipped
by value, greedy val CIDEr-D after each epoch, the best epoch saved with ``save_decoder``, and the
same kill-safety: the best epoch so far and a settings-matched resume file live in undeclared
siblings of ``out_path`` (``xe.run_files``), epochs are re-seeded per (seed, epoch) so an
interrupted run ends with the same weights, and ``out_path`` is written only at the end.

``amp`` and ``pin_memory`` are the GPU options of ``captioning.training.xe`` (CUDA only; the
greedy baseline and the sampling run under autocast, the reward-weighted loss in fp32).

With ``keep_zeros`` (default) every parameter entry that is exactly zero in the starting
checkpoint (a pruned model's pruned weights) gets no gradient and is re-zeroed after every step,
so SCST cannot undo pruning.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..compress.prune import measured_sparsity
from ..errors import UserError
from ..evaluation.cider import CiderD
from ..io import write_json
from ..models import read_decoder_meta, save_decoder
from ..models.search import greedy, sample
from ..utils import pick_device, seed_everything, set_threads
from .loader import CaptionData, to_device
from .xe import (MixedPrecision, _decoder_from_checkpoint, _finish, _save_resume, cider_d, file_sha256,
                 generate_captions, load_refs, optimizer_step, resume_if_possible, run_files)

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


# ---- pruning masks ---------------------------------------------------------------------------------

def zero_masks(decoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: True where the entry is nonzero} for parameters holding exact zeros."""
    return {n: p.detach() != 0 for n, p in decoder.named_parameters() if bool((p == 0).any())}


@torch.no_grad()
def _apply_masks(decoder: torch.nn.Module, masks: dict[str, torch.Tensor], grads: bool) -> None:
    for n, p in decoder.named_parameters():
        if n in masks:
            t = p.grad if grads else p
            if t is not None:
                t.masked_fill_(~masks[n], 0.0)


# ---- training ------------------------------------------------------------------------------------

def train_scst(init_from, features_h5, prepared_dir, out_path, epochs: int = 2, batch_size: int = 50,
               lr: float = 2e-5, sample_n: int = 5, baseline: str = "greedy", max_len: int = 16, seed: int = 0,
               device: str = "auto", threads: int | None = None, log_json=None, grad_clip: float = 0.1,
               keep_zeros: bool = True, keep_resume: bool = False, progress: bool = True, amp: bool = False,
               pin_memory: bool = False) -> dict:
    """Fine-tune the decoder at ``init_from`` with SCST; write its best val CIDEr-D epoch to ``out_path``.

    Returns (and writes to ``log_json`` after every epoch) {"settings", "history", "best_epoch",
    "best_val_cider", "init_val_cider", "out_path"}; history rows are {"epoch" (1-based), "lr",
    "loss", "reward" (mean sampled reward), "baseline" (mean baseline), "val_cider", "seconds"}.
    ``init_val_cider`` is the starting checkpoint's own recorded val score, if any.
    ``keep_resume``: keep the resume and best files (``xe.run_files``) after the end.
    ``amp``, ``pin_memory``: as in ``train_xe`` (no-ops on a CPU; set, they enter the settings and
    the checkpoint's metadata).
    """
    if baseline not in BASELINES:
        raise UserError(f"unknown SCST baseline {baseline!r}; known: {', '.join(BASELINES)}")
    if sample_n < 1 or (baseline == "mean" and sample_n < 2):
        raise UserError(f"sample_n {sample_n}: need at least {2 if baseline == 'mean' else 1} samples per image"
                        + (" for the 'mean' baseline" if baseline == "mean" else ""))
    set_threads(threads)
    device = pick_device(device)
    out_path, prepared_dir = Path(out_path), Path(prepared_dir)
    resume_path, best_path = run_files(out_path)

    data = CaptionData(features_h5, prepared_dir, seq_per_img=1)
    if len(data.index("train")) == 0 or len(data.index("val")) == 0:
        raise UserError(f"{prepared_dir / 'images.json'}: needs images in both the train and val splits")
    refs_val = load_refs(prepared_dir / "refs_val.json")
    scorer = CiderD(train_references(data))

    seed_everything(seed)
    init_meta = read_decoder_meta(init_from)
    decoder = _decoder_from_checkpoint(init_from, None, {}, data, device)
    masks = zero_masks(decoder) if keep_zeros else {}
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    mp = MixedPrecision(amp, device, "scst")
    init = {"sha256": file_sha256(init_from), "bytes": Path(init_from).stat().st_size}
    settings = {
        "stage": "scst", "decoder": decoder.config, "init_from": init, "batch_size": batch_size, "lr": lr,
        "sample_n": sample_n, "baseline": baseline, "max_len": max_len, "seed": seed, "grad_clip": grad_clip,
        "grad_clip_mode": "value", "keep_zeros": keep_zeros, "data": data.fingerprint(),
    }
    gpu_options = {k: True for k, v in (("amp", amp), ("pin_memory", pin_memory)) if v}
    settings.update(gpu_options)  # only when set, so existing resume files keep matching

    start, history, best_cider, best_epoch = resume_if_possible(
        "scst", out_path, settings, decoder, optimizer, mp)

    def report() -> dict:
        return {"settings": settings, "history": history, "best_epoch": best_epoch,
                "best_val_cider": best_cider if best_epoch else None,
                "init_val_cider": init_meta.get("val_cider"), "out_path": str(out_path)}

    for epoch in range(start, epochs):
        t0 = time.time()
        epoch_seed = seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)                                     # dropout
        gen = torch.Generator().manual_seed(epoch_seed + 1)               # shuffling
        sampler = torch.Generator(device=device).manual_seed(epoch_seed + 2)  # caption sampling

        decoder.train()
        sums = np.zeros(3)  # loss, reward, baseline
        n_batches = 0
        bar = tqdm(data.batches("train", batch_size, shuffle=True, generator=gen, with_labels=False),
                   total=data.num_batches("train", batch_size), desc=f"scst epoch {epoch + 1}/{epochs}",
                   file=sys.stderr, disable=not progress, leave=False)
        for b in bar:
            b = to_device(b, device, pin_memory)
            fc, att = b.fc, b.att
            ids = np.repeat(b.ids, sample_n).tolist()
            if baseline == "greedy":
                decoder.eval()
                with torch.no_grad(), mp.autocast():
                    best_guess = data.decode(greedy(decoder, fc, att, max_len).cpu())
                decoder.train()
                base = np.repeat(scorer.scores(b.ids, best_guess), sample_n)
            with mp.autocast():
                seq, logprobs = sample(decoder, fc, att, sample_n, max_len=max_len, generator=sampler)
            logprobs = logprobs.float()
            reward = scorer.scores(ids, data.decode(seq.cpu()))
            if baseline == "mean":
                base = leave_one_out_mean(reward, sample_n)

            loss = scst_loss(logprobs, torch.from_numpy(reward).to(logprobs),
                             torch.from_numpy(base).to(logprobs))
            optimizer_step(loss, decoder, optimizer, mp.scaler, grad_clip,
                           lambda d: _apply_masks(d, masks, grads=True), lambda d: _apply_masks(d, masks, grads=False))

            sums += (loss.item(), reward.mean(), base.mean())
            n_batches += 1
            bar.set_postfix(reward=f"{sums[1] / n_batches:.3f}", baseline=f"{sums[2] / n_batches:.3f}")

        caps = generate_captions(decoder, data, "val", 1, max_len, batch_size, device, progress, pin_memory)
        val_cider = cider_d(caps, refs_val, str(prepared_dir / "refs_val.json"))
        loss_m, reward_m, base_m = (float(x) for x in sums / max(n_batches, 1))
        history.append({"epoch": epoch + 1, "lr": lr, "loss": loss_m, "reward": reward_m, "baseline": base_m,
                        "val_cider": val_cider, "seconds": round(time.time() - t0, 3)})
        print(f"scst epoch {epoch + 1}/{epochs}: reward {reward_m:.4f}  baseline {base_m:.4f}  "
              f"val CIDEr-D {val_cider:.4f}  ({time.time() - t0:.1f} s)", file=sys.stderr)

        if val_cider > best_cider:
            best_cider, best_epoch = val_cider, epoch + 1
            extra = {k: v for k, v in init_meta.items() if k not in ("format", "config", "amp", "pin_memory")}
            extra.update(gpu_options)
            extra.update(stage="scst", baseline=baseline, sample_n=sample_n, epoch=epoch + 1, val_cider=val_cider,
                         init_val_cider=init_meta.get("val_cider"), init_from={"path": str(init_from), **init})
            if "sparsity" in init_meta:
                extra.update(measured_sparsity(decoder))
            save_decoder(decoder, best_path, extra)
        _save_resume(resume_path, decoder, optimizer, {
            "settings": settings, "epoch": epoch + 1, "history": history,
            "best_val_cider": best_cider, "best_epoch": best_epoch,
            **({"amp_scaler": mp.state()} if mp.active else {}),
        })
        if log_json:
            write_json(log_json, report())

    _finish(out_path, best_epoch, keep_resume)
    if log_json:
        write_json(log_json, report())
    return report()
