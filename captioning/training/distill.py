"""Knowledge distillation: a compact student also learns from a stronger teacher decoder.

Two modes (``KD_MODES``):

- "word", Hinton et al.'s recipe applied per word: at every position of a reference caption
  (teacher forcing, exactly the positions the XE loss counts), the student's next-word
  distribution, softened by a temperature T, is pulled towards the teacher's, softened the same way:

      loss = (1 - kd_weight) * XE(student, reference) + kd_weight * T^2 * KL(teacher_T || student_T)

  Softening scales the KD gradients by 1/T^2; the T^2 factor undoes that, so ``kd_weight`` means
  the same at any temperature.

- "sequence", Kim & Rush's sequence-level distillation (2016): the teacher's own beam-search
  caption of each image (beam ``SEQUENCE_KD_BEAM``) is one more target, learnt by cross-entropy:

      loss = (1 - kd_weight) * XE(student, references) + kd_weight * XE(student, teacher's caption)

  A small student cannot match the teacher's whole distribution; learning the mode the teacher's
  beam search finds is what beam search over the student then needs. The temperature is unused.
  Each image is decoded once, at its first batch, and its caption kept for later epochs.

The teacher is a trained decoder over its own features of the same images in the same order:
the student's, or another encoder's (e.g. ResNet-50 grids, 2048-d, while the student sees
EfficientNet-Lite0's 1280-d). It is frozen: eval mode (no dropout), no gradients; it only
supplies targets. ``DistillStep`` is the training step (it rejects an unknown mode);
``train_xe(teacher=..., teacher_features=...)`` runs it. The teacher's features come through the
student's kind of feature store (``features``): streamed when the student's are.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models import load_decoder, read_decoder_meta
from ..models.search import beam_search
from .features import open_features
from .loader import CaptionData, to_device
from .loop import trim_padding

KD_MODES = ("word", "sequence")
SEQUENCE_KD_BEAM = 3


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
        self._captions: dict[int, torch.Tensor] = {}   # image id -> its beam caption [max_length], on the CPU

    def fingerprint(self) -> str:
        """A short hash of the teacher's pooled features: tells a resume file made with other ones.
        Hashed a block at a time: the same hash as one whole array."""
        h = hashlib.sha1()
        for block in self.features.fc_blocks():
            h.update(np.ascontiguousarray(block).tobytes())
        return h.hexdigest()[:16]

    def _read(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        fc, att = self.features.read(np.array([self.row[int(i)] for i in ids], dtype=np.int64))
        return to_device(fc, self.device, self.pin_memory), to_device(att, self.device, self.pin_memory)

    @torch.no_grad()
    def logprobs(self, ids: list[int], seq: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-probabilities [R, T+1, V+1] for a batch's image ids and its captions ``seq``."""
        return self.decoder(*self._read(ids), seq.to(self.device))

    @torch.no_grad()
    def captions(self, ids: list[int], max_length: int) -> torch.Tensor:
        """The teacher's beam-search caption of each image, [B, max_length] 0-padded, on the CPU.

        Deterministic (eval mode, no sampling), so each image is decoded once and kept.
        """
        new = list(dict.fromkeys(int(i) for i in ids if int(i) not in self._captions))
        if new:
            seq = beam_search(self.decoder, *self._read(new), SEQUENCE_KD_BEAM, max_length).cpu()
            self._captions.update(zip(new, seq))
        return torch.stack([self._captions[int(i)] for i in ids])


def with_teacher_captions(labels: torch.Tensor, teacher_seq: torch.Tensor) -> torch.Tensor:
    """[B*k, L] references and [B, L'] teacher captions -> [B*(k+1), max(L, L')]: each image's k
    references, then its teacher caption (the row layout ``CaptionDecoder.forward`` expects)."""
    B, width = teacher_seq.shape[0], max(labels.shape[1], teacher_seq.shape[1])
    refs = F.pad(labels, (0, width - labels.shape[1])).view(B, -1, width)
    teach = F.pad(teacher_seq, (0, width - teacher_seq.shape[1])).view(B, 1, width)
    return torch.cat([refs, teach], 1).view(-1, width)


class DistillStep:
    """Cross-entropy to the references mixed with a ``Teacher``'s pull, by ``mode`` (``KD_MODES``):
    "word": (1 - w) * XE + w * T^2 * KL; "sequence": (1 - w) * XE + w * XE(teacher's beam caption).

    ``xe_loss(logprobs, seq)`` is the plain cross-entropy (``xe.sequence_loss``); history rows get
    the mixed "loss" and the KD part alone as "kd_loss". ``max_length``: the teacher's captions'.
    """
    with_labels = True

    def __init__(self, mp, teacher: Teacher, kd_weight: float, temperature: float, xe_loss,
                 mode: str = "word", max_length: int = 16):
        if mode not in KD_MODES:
            raise UserError(f"unknown distillation mode {mode!r}; known: {', '.join(KD_MODES)}")
        self.mp, self.teacher, self.kd_weight, self.temperature, self.xe_loss = mp, teacher, kd_weight, temperature, xe_loss
        self.mode, self.max_length = mode, max_length

    def start_epoch(self, epoch_seed: int) -> None:
        pass

    def __call__(self, decoder, b):
        if self.mode == "sequence":
            return self._sequence(decoder, b)
        with self.mp.autocast():
            logprobs = decoder(b.fc, b.att, b.labels).float()
            teacher_logprobs = self.teacher.logprobs(b.ids, b.labels).float()
        kd_part = kd_loss(logprobs, teacher_logprobs, b.labels, self.temperature)
        loss = (1 - self.kd_weight) * self.xe_loss(logprobs, b.labels) + self.kd_weight * kd_part
        return loss, {"loss": loss.item(), "kd_loss": kd_part.item()}

    def _sequence(self, decoder, b):
        """One teacher-forced pass over each image's references and its teacher caption together."""
        teach = self.teacher.captions(b.ids, self.max_length)
        teach = trim_padding(teach).to(b.labels.device)
        seq = with_teacher_captions(b.labels, teach)
        B, width = teach.shape[0], seq.shape[1]
        with self.mp.autocast():
            logprobs = decoder(b.fc, b.att, seq).float()
        logprobs = logprobs.view(B, -1, width + 1, logprobs.shape[-1])
        refs = seq.view(B, -1, width)
        kd_part = self.xe_loss(logprobs[:, -1], refs[:, -1])
        xe_part = self.xe_loss(logprobs[:, :-1].reshape(-1, width + 1, logprobs.shape[-1]),
                               refs[:, :-1].reshape(-1, width))
        loss = (1 - self.kd_weight) * xe_part + self.kd_weight * kd_part
        return loss, {"loss": loss.item(), "kd_loss": kd_part.item()}
