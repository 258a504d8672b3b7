"""Knowledge distillation: a compact student also learns a big-encoder teacher's word distributions.

Hinton et al.'s recipe, applied per word: at every position of a reference caption (teacher
forcing, exactly the positions the XE loss counts), the student's next-word distribution,
softened by a temperature T, is pulled towards the teacher's, softened the same way:

    loss = (1 - kd_weight) * XE(student, reference) + kd_weight * T^2 * KL(teacher_T || student_T)

Softening scales the KD gradients by 1/T^2; the T^2 factor undoes that, so ``kd_weight`` means
the same at any temperature.

The teacher is a trained decoder over a *different* encoder's features (e.g. ResNet-50 grids,
2048-d, while the student sees MobileNetV3's 576-d) of the same images in the same order. It is
frozen: eval mode (no dropout), no gradients; it only supplies targets. ``DistillStep`` is the
training step; ``train_xe(teacher=..., teacher_features=...)`` runs it. The teacher's features
come through the student's kind of feature store (``features``): streamed when the student's are.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models import load_decoder, read_decoder_meta
from .features import open_features
from .loader import CaptionData, to_device


def token_mask(seq: torch.Tensor) -> torch.Tensor:
    """[R, T] captions -> [R, T+1] bool: the positions ``sequence_loss`` counts (every word, first end token)."""
    return torch.cat([seq.new_ones(seq.shape[0], 1, dtype=torch.bool), seq > 0], 1)


def soften(logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities of softmax(logits / T); decoders emit log-softmax, which differs from logits by a constant."""
    return logprobs if temperature == 1 else F.log_softmax(logprobs / temperature, dim=-1)


def kd_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, seq: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the counted word positions of ``seq``.

    Both log-probability tensors are [R, T+1, V+1] from teacher-forced ``forward(fc, att, seq)``.
    Classes the teacher gives probability 0 contribute 0 (not NaN).
    """
    s = soften(student_logprobs, temperature)
    t = soften(teacher_logprobs.detach(), temperature)
    p = t.exp()
    kl = torch.where(p > 0, p * (t - s), torch.zeros_like(s)).sum(-1)   # [R, T+1]
    mask = token_mask(seq).to(kl.dtype)
    return temperature ** 2 * (kl * mask).sum() / mask.sum()


class Teacher:
    """A frozen decoder plus its own features of the training images: ``logprobs(ids, seq)`` gives its targets.

    ``student_features`` only names the student's features file in error messages; the student's
    image ids come from ``data``. ``pin_memory``: as in ``loader.to_device`` (CUDA only).
    The teacher's features are streamed when the student's are, else stored as ``features`` and
    ``memory_limit_mb`` say (``features.open_features``); a step reads its batch's rows.
    """

    def __init__(self, checkpoint: str | Path, features_h5: str | Path, data: CaptionData,
                 student_features: str | Path = "the student's features", device: str = "cpu",
                 pin_memory: bool = False, features: str = "auto", memory_limit_mb: float = 4000):
        checkpoint, features_h5 = Path(checkpoint), Path(features_h5)
        self.features = open_features(features_h5, "stream" if data.features.streaming else features,
                                      memory_limit_mb)
        if not np.array_equal(self.features.ids, data.ids):
            raise UserError(f"{features_h5}: image ids differ from {student_features} (the teacher's and the "
                            "student's features must cover the same images in the same order)")
        self.row = {int(i): r for r, i in enumerate(data.ids)}

        meta = read_decoder_meta(checkpoint)
        with torch.random.fork_rng(devices=[]):  # building the module draws init weights: keep the caller's RNG
            self.decoder = load_decoder(checkpoint, device).eval().requires_grad_(False)
        cfg = self.decoder.config
        if cfg["vocab_size"] != data.vocab_size:
            raise UserError(f"{checkpoint}: teacher has vocab_size {cfg['vocab_size']}, the training data "
                            f"{data.vocab_size}")
        if "itow" in meta and meta["itow"] != data.itow_json():
            raise UserError(f"{checkpoint}: the teacher's vocabulary differs from the prepared dataset's vocab.json")
        if cfg["feat_dim"] != self.features.feat_dim:
            raise UserError(f"{checkpoint}: teacher expects {cfg['feat_dim']}-d features, "
                            f"{features_h5} holds {self.features.feat_dim}-d")
        self.device, self.pin_memory = device, pin_memory

    def fingerprint(self) -> str:
        """A short hash of the teacher's pooled features: tells a resume file made with other ones.
        Hashed a block at a time: the same hash as one whole array."""
        h = hashlib.sha1()
        for block in self.features.fc_blocks():
            h.update(np.ascontiguousarray(block).tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def logprobs(self, ids: list[int], seq: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-probabilities [R, T+1, V+1] for a batch's image ids and its captions ``seq``."""
        fc, att = self.features.read(np.array([self.row[int(i)] for i in ids], dtype=np.int64))
        fc, att = to_device(fc, self.device, self.pin_memory), to_device(att, self.device, self.pin_memory)
        return self.decoder(fc, att, seq.to(self.device))


class DistillStep:
    """Cross-entropy to the references mixed with the KL to a ``Teacher``: (1 - w) * XE + w * T^2 * KL.

    ``xe_loss(logprobs, seq)`` is the plain cross-entropy (``xe.sequence_loss``); history rows get
    the mixed "loss" and the KD part alone as "kd_loss".
    """
    with_labels = True

    def __init__(self, mp, teacher: Teacher, kd_weight: float, temperature: float, xe_loss):
        self.mp, self.teacher, self.kd_weight, self.temperature, self.xe_loss = mp, teacher, kd_weight, temperature, xe_loss

    def start_epoch(self, epoch_seed: int) -> None:
        pass

    def __call__(self, decoder, b):
        with self.mp.autocast():
            logprobs = decoder(b.fc, b.att, b.labels).float()
            teacher_logprobs = self.teacher.logprobs(b.ids, b.labels).float()
        kd_part = kd_loss(logprobs, teacher_logprobs, b.labels, self.temperature)
        loss = (1 - self.kd_weight) * self.xe_loss(logprobs, b.labels) + self.kd_weight * kd_part
        return loss, {"loss": loss.item(), "kd_loss": kd_part.item()}
