"""Cross-entropy ("XE") training with teacher forcing, as the reference trains its first stage.

One epoch is: shuffled batches of images with ``seq_per_img`` captions each, Adam, gradients
clipped by value (0.1, the reference's default mode), then greedy (or beam) decoding of the val
split scored with CIDEr-D. The best epoch by val CIDEr-D is saved with ``save_decoder``.

Learning rate: ``lr * lr_decay_rate ** (epoch // lr_decay_every)`` (0-based epochs), the
reference's step decay.

Kill-safety: ``out_path`` is written once, when training ends, because Snakemake deletes the
declared output of a killed job before rerunning it, and because a file there mid-run would look
done. Until then two undeclared siblings hold the run (see ``run_files``): after every epoch
``<out_path>.resume.safetensors`` gets the model, Adam's state, the epoch, the best score and the
history, and ``<out_path>.best.safetensors`` the best epoch so far. A new call with the same
settings continues from them and gives the same weights as an uninterrupted run, because all
randomness of an epoch (shuffling, caption choice, dropout) is re-seeded from (seed, epoch)
rather than carried over. At the end the best file is copied to ``out_path`` and both siblings
are deleted; ``keep_resume=True`` keeps them, and since ``epochs`` is not part of the settings,
such a finished run can also be extended.

Fine-tuning (e.g. after pruning) is the same loop: ``init_from`` starts from a saved decoder,
rebuilt from the checkpoint's own config (a ``decoder_name``/``decoder_cfg`` that contradicts it
is a UserError rather than silently ignored), and a ``captioning.compress.prune.Pruner`` keeps
pruned weights at zero. With a pruner, only epochs at the final sparsity may become the kept
checkpoint, whose metadata records the sparsity measured from its weights.

Knowledge distillation is an option of the same loop: with ``teacher`` (a trained decoder over
another encoder's ``teacher_features``) the loss mixes in the word-level KL to the teacher's
distribution; see ``captioning.training.distill``.

GPU options, both off by default and no-ops off CUDA: ``pin_memory`` sends batches through
page-locked memory with asynchronous copies (``loader.to_device``); ``amp`` runs the training
forward passes under fp16 autocast with a loss-scaling ``GradScaler`` (``MixedPrecision``),
whose state the resume file keeps so a resumed run continues with the same scale. On a CPU,
amp prints a one-time note and trains in fp32: fp16/bf16 compute is many times slower there.
Validation decoding stays fp32, as the evaluation stage decodes.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..compress.prune import Pruner, measured_sparsity
from ..errors import UserError
from ..io import atomic_path, load_tensors, read_json, save_tensors, write_json
from ..models import CaptionDecoder, create_decoder, load_decoder, read_decoder_meta, save_decoder
from ..models.search import beam_search, greedy
from ..utils import pick_device, seed_everything, set_threads
from .distill import Teacher, kd_loss
from .loader import CaptionData, to_device

RESUME_FORMAT = "captioning.xe-resume/1"


# ---- loss ------------------------------------------------------------------------------------

def trim_padding(seq: torch.Tensor) -> torch.Tensor:
    """Drop the all-zero columns at the end of a 0-padded batch (saves decoder steps)."""
    n = int((seq > 0).sum(1).max()) if seq.numel() else 0
    return seq[:, :max(n, 1)]


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


# ---- validation --------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]")


def simple_tokenize(text: str) -> str:
    """Lowercase, delete punctuation, normalise spaces: a Java-free stand-in for the PTB tokenizer."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def load_refs(refs_json: str | Path) -> dict[int, list[str]]:
    """COCO-format annotations -> {image_id: [caption, ...]}."""
    data = read_json(refs_json)
    refs: dict[int, list[str]] = {}
    try:
        for a in data["annotations"]:
            refs.setdefault(int(a["image_id"]), []).append(str(a["caption"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{refs_json}: not COCO caption annotations ({e!r})") from None
    return refs


def cider_d(captions: list[dict], refs: dict[int, list[str]], refs_name: str = "references") -> float:
    """Corpus CIDEr-D (pycocoevalcap's Cider: clipped, length-penalised) of [{"image_id", "caption"}]."""
    from pycocoevalcap.cider.cider import Cider

    if not captions:
        return 0.0
    missing = [c["image_id"] for c in captions if c["image_id"] not in refs]
    if missing:
        raise UserError(f"{refs_name}: no reference captions for image id {missing[0]} "
                        f"({len(missing)} of {len(captions)} missing)")
    res = {c["image_id"]: [simple_tokenize(c["caption"])] for c in captions}
    gts = {i: [simple_tokenize(r) for r in refs[i]] for i in res}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


@torch.no_grad()
def generate_captions(decoder: CaptionDecoder, data: CaptionData, split: str, beam_size: int = 1,
                      max_len: int = 16, batch_size: int = 50, device: str = "cpu",
                      progress: bool = True, pin_memory: bool = False) -> list[dict]:
    """Caption every image of a split: [{"image_id", "caption"}] in file order."""
    was_training = decoder.training
    decoder.eval()
    out = []
    batches = data.batches(split, batch_size, with_labels=False)
    for b in tqdm(batches, total=data.num_batches(split, batch_size), desc=f"decode {split}",
                  file=sys.stderr, disable=not progress, leave=False):
        b = to_device(b, device, pin_memory)
        fc, att = b.fc, b.att
        seq = greedy(decoder, fc, att, max_len) if beam_size <= 1 else beam_search(decoder, fc, att, beam_size, max_len)
        out += [{"image_id": i, "caption": c} for i, c in zip(b.ids, data.decode(seq.cpu()))]
    decoder.train(was_training)
    return out


# ---- one optimizer step, and mixed precision (CUDA only) ---------------------------------------

# Device type -> autocast dtype. CUDA only: on CPUs without fp16/bf16 units, such as this
# project's machines, low-precision compute is 4 to 30 times slower than fp32.
AMP_DTYPES: dict[str, torch.dtype] = {"cuda": torch.float16}
_amp_noted: set[str] = set()  # device types already told that amp does nothing there


class MixedPrecision:
    """The ``amp`` option of a training loop: fp16 autocast plus loss scaling where ``AMP_DTYPES`` allows.

    fp16 gradients of small losses underflow to 0, so the ``GradScaler`` multiplies the loss
    before ``backward``, divides the gradients again before anything reads them, skips steps
    whose gradients overflowed and adapts its factor. Inactive (amp off, or another device),
    ``autocast()`` does nothing and the scaler passes everything through, so the run is the
    plain fp32 run bit for bit. Only forward passes go under ``autocast()``; losses are fp32.
    """

    def __init__(self, amp: bool, device: str, who: str = "train"):
        self.kind = torch.device(device).type
        self.dtype = AMP_DTYPES.get(self.kind) if amp else None
        if amp and self.dtype is None and self.kind not in _amp_noted:
            _amp_noted.add(self.kind)
            print(f"{who}: amp is a no-op on {self.kind} (float16/bfloat16 compute is slower than float32 "
                  "there); training in float32", file=sys.stderr)
        self.scaler = torch.amp.GradScaler(self.kind, enabled=self.active)

    @property
    def active(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        return torch.autocast(self.kind, dtype=self.dtype) if self.active else contextlib.nullcontext()

    def state(self) -> dict:
        """The scaler's state as plain numbers (for the resume file's metadata); {} when inactive."""
        return {k: v.item() if torch.is_tensor(v) else v for k, v in self.scaler.state_dict().items()}

    def load_state(self, state: dict | None, path) -> None:
        """Continue with a saved scale; without one (e.g. the run began on a CPU) the scaler starts afresh."""
        if not (self.active and state):
            return
        try:
            self.scaler.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"{path}: unreadable amp scaler state ({e!r})") from None


def optimizer_step(loss: torch.Tensor, decoder: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, grad_clip: float, before_step=None, after_step=None) -> None:
    """Backward and one step, in the order AMP and pruning need.

    Gradients are unscaled first (nothing to do without AMP), so ``before_step(decoder)`` (zeroing
    pruned weights' gradients) and clipping by value (``grad_clip`` > 0) see the true ones. The
    scaler skips the step when a gradient is inf/NaN; ``after_step(decoder)`` runs either way.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if before_step is not None:
        before_step(decoder)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_value_(decoder.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if after_step is not None:
        after_step(decoder)


# ---- resume file: model + Adam state as tensors, everything else as JSON metadata -------------

def _save_resume(path: Path, decoder, optimizer, meta: dict, pruner: Pruner | None = None) -> None:
    tensors = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    if pruner is not None:
        tensors.update({f"pruner.{k}": v for k, v in pruner.state_tensors().items()})
    scalars: dict[str, dict] = {}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = v
            else:
                scalars.setdefault(str(i), {})[k] = v
    save_tensors(path, tensors, {**meta, "format": RESUME_FORMAT, "optim_scalars": scalars})


def _load_resume(path: Path, decoder, optimizer, pruner: Pruner | None = None) -> dict:
    tensors, meta = load_tensors(path)
    decoder.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if pruner is not None:
        pruner.load_state_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("pruner.")}, decoder)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    for i, st in meta.get("optim_scalars", {}).items():
        state.setdefault(int(i), {}).update(st)
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return meta


def _read_resume_meta(path: Path) -> dict | None:
    try:
        return load_tensors(path)[1] if path.is_file() else None
    except UserError:
        return None  # a damaged resume file is ignored, training starts over


# ---- kill-safe outputs: the run lives in undeclared siblings until it ends -------------------

def run_files(out_path) -> tuple[Path, Path]:
    """(resume file, best-so-far checkpoint): the siblings of ``out_path`` that hold an unfinished run."""
    return Path(f"{out_path}.resume.safetensors"), Path(f"{out_path}.best.safetensors")


def _resume_problem(meta: dict, settings: dict, best_path: Path) -> str | None:
    """Why a resume file cannot be continued from, or None when it can.

    Besides the settings, the best checkpoint it names must still be there: a kill between
    writing the best file and the resume file leaves them one epoch apart, so the epochs must agree.
    """
    if meta.get("format") != RESUME_FORMAT or meta.get("settings") != settings:
        return "made with other settings"
    best_epoch = int(meta.get("best_epoch") or 0)
    if best_epoch:
        if not best_path.is_file():
            return f"{best_path} is gone"
        try:
            held = read_decoder_meta(best_path).get("epoch")
        except UserError:
            held = None
        if held != best_epoch:
            return f"{best_path} holds epoch {held}, not the best epoch {best_epoch}"
    return None


def _finish(out_path: Path, best_epoch: int, keep_resume: bool) -> None:
    """Publish the best checkpoint at ``out_path`` (atomically), then drop the run files unless kept.

    Copy, not move: if a kill comes before the resume file is gone, the rerun still finds both.
    """
    resume_path, best_path = run_files(out_path)
    if best_epoch:
        with atomic_path(out_path) as tmp:
            shutil.copyfile(best_path, tmp)
    if not keep_resume:
        resume_path.unlink(missing_ok=True)
        best_path.unlink(missing_ok=True)


# ---- starting from a saved decoder -------------------------------------------------------------

def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _decoder_from_checkpoint(path, decoder_name: str | None, decoder_cfg: dict, data: CaptionData, device: str):
    """Rebuild a saved decoder; refuse one that contradicts the asked name/settings or the data."""
    path = Path(path)
    meta = read_decoder_meta(path)
    decoder = load_decoder(path, device)
    cfg = decoder.config
    if decoder_name and decoder_name != cfg["name"]:
        raise UserError(f"{path}: holds a {cfg['name']!r} decoder, not {decoder_name!r}")
    for k, v in decoder_cfg.items():
        if cfg.get(k) != v:
            raise UserError(f"{path}: decoder setting {k} is {cfg.get(k)!r} in the checkpoint, {v!r} was asked")
    for k, v in (("vocab_size", data.vocab_size), ("feat_dim", data.feat_dim)):
        if cfg.get(k) != v:
            raise UserError(f"{path}: decoder has {k} {cfg.get(k)}, the training data {v}")
    itow = {str(k): w for k, w in sorted(data.itow.items())}
    if "itow" in meta and meta["itow"] != itow:
        raise UserError(f"{path}: its vocabulary differs from the prepared dataset's vocab.json")
    return decoder


# ---- training ----------------------------------------------------------------------------------

def resume_if_possible(who: str, out_path: Path, settings: dict, decoder, optimizer, mp,
                       pruner: Pruner | None = None) -> tuple[int, list, float, int]:
    """Load a matching resume file into decoder/optimizer/scaler (and the pruner's masks).

    Returns (epochs done, history, best val CIDEr-D, best epoch): (0, [], -inf, 0) when
    there is nothing usable to resume from, with one line saying why on stderr.
    """
    resume_path, best_path = run_files(out_path)
    meta = _read_resume_meta(resume_path)
    if meta is None:
        return 0, [], float("-inf"), 0
    problem = _resume_problem(meta, settings, best_path)
    if problem:
        print(f"{who}: ignoring {resume_path} ({problem}); starting over", file=sys.stderr)
        return 0, [], float("-inf"), 0
    meta = _load_resume(resume_path, decoder, optimizer, pruner)
    mp.load_state(meta.get("amp_scaler"), resume_path)
    start = int(meta["epoch"])
    print(f"{who}: resuming {out_path} after epoch {start}", file=sys.stderr)
    return start, list(meta["history"]), float(meta["best_val_cider"]), int(meta["best_epoch"])


def train_xe(features_h5, prepared_dir, out_path, decoder_name: str, decoder_cfg: dict | None = None,
             epochs: int = 5, batch_size: int = 50, lr: float = 5e-4, lr_decay_every: int = 3,
             lr_decay_rate: float = 0.8, grad_clip: float = 0.1, seq_per_img: int = 5, beam_size: int = 1,
             max_len: int = 16, seed: int = 0, device: str = "auto", threads: int | None = None,
             log_json=None, keep_resume: bool = False, progress: bool = True,
             init_from: str | Path | None = None, pruner: Pruner | None = None, stage: str = "xe",
             teacher: str | Path | None = None, teacher_features: str | Path | None = None,
             kd_weight: float = 0.5, kd_temperature: float = 1.0, amp: bool = False,
             pin_memory: bool = False) -> dict:
    """Train a decoder with cross-entropy; write the best val CIDEr-D epoch to ``out_path`` at the end.

    Returns (and writes to ``log_json`` after every epoch) {"settings", "history", "best_epoch",
    "best_val_cider", "out_path"}; history rows are {"epoch" (1-based), "lr", "loss", "val_cider",
    "seconds"}, plus "sparsity" with a pruner. ``grad_clip`` <= 0 disables clipping.

    ``init_from``: a decoder file to start from; its config is used, and ``decoder_name`` may be
    None. ``pruner``: masks applied throughout; best-epoch choice only among its target epochs.
    ``stage`` is written into the checkpoint's metadata. The settings (for resume matching) name
    the init file by its sha256, the pruner by ``describe()``.

    ``teacher`` + ``teacher_features``: distil from that frozen decoder over those features (same
    images, same order as ``features_h5``): loss = (1 - kd_weight) * XE + kd_weight * T^2 * KL with
    T = ``kd_temperature``; history rows then also hold the epoch's mean "kd_loss".

    ``amp``: fp16 mixed precision on CUDA (``MixedPrecision``); ``pin_memory``: pinned, asynchronous
    host-to-GPU copies (``loader.to_device``). Both are no-ops on a CPU (amp says so once); set,
    they enter the settings and the checkpoint's metadata.

    ``out_path`` is not written when no epoch was eligible (a pruner that never reached its target).
    ``keep_resume``: keep the resume and best files (see ``run_files``) after the end.
    """
    set_threads(threads)
    device = pick_device(device)
    out_path, prepared_dir = Path(out_path), Path(prepared_dir)
    resume_path, best_path = run_files(out_path)
    decoder_cfg = dict(decoder_cfg or {})
    clash = sorted({"name", "vocab_size", "feat_dim"} & set(decoder_cfg))
    if clash:
        raise UserError(f"decoder config: {', '.join(clash)} come from the data and the decoder name; remove them")

    data = CaptionData(features_h5, prepared_dir, seq_per_img)
    if len(data.index("train")) == 0 or len(data.index("val")) == 0:
        raise UserError(f"{prepared_dir / 'images.json'}: needs images in both the train and val splits")
    refs_val = load_refs(prepared_dir / "refs_val.json")
    kd = None
    if teacher is not None or teacher_features is not None:
        if teacher is None or teacher_features is None:
            raise UserError("knowledge distillation needs both a teacher checkpoint and the teacher's features file")
        if not 0 <= kd_weight <= 1 or kd_temperature <= 0:
            raise UserError(f"kd_weight must be in [0, 1] and kd_temperature > 0, got {kd_weight} and {kd_temperature}")
        kd = Teacher(teacher, teacher_features, data, features_h5, device, pin_memory)

    seed_everything(seed)
    if init_from is not None:
        decoder = _decoder_from_checkpoint(init_from, decoder_name, decoder_cfg, data, device)
    elif not decoder_name:
        raise UserError("no decoder name given, and no checkpoint to start from (init_from)")
    else:
        decoder = create_decoder(decoder_name, data.vocab_size, data.feat_dim, **decoder_cfg).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    mp = MixedPrecision(amp, device, stage)
    settings = {
        "decoder": decoder.config, "batch_size": batch_size, "lr": lr, "lr_decay_every": lr_decay_every,
        "lr_decay_rate": lr_decay_rate, "grad_clip": grad_clip, "grad_clip_mode": "value",
        "seq_per_img": seq_per_img, "beam_size": beam_size, "max_len": max_len, "seed": seed,
        "data": data.fingerprint(),
    }
    # only when used, so plain XE resume files keep matching
    if stage != "xe":
        settings["stage"] = stage
    if init_from is not None:
        settings["init_from"] = {"sha256": file_sha256(init_from), "bytes": Path(init_from).stat().st_size}
    if pruner is not None:
        settings["pruner"] = pruner.describe()
    if kd is not None:
        settings["kd"] = {"teacher_sha256": file_sha256(teacher), "teacher_features": kd.fingerprint(),
                          "kd_weight": kd_weight, "kd_temperature": kd_temperature}
    gpu_options = {k: True for k, v in (("amp", amp), ("pin_memory", pin_memory)) if v}
    settings.update(gpu_options)  # only when set, so existing resume files keep matching

    start, history, best_cider, best_epoch = resume_if_possible(
        "xe", out_path, settings, decoder, optimizer, mp, pruner)

    def report() -> dict:
        return {"settings": settings, "history": history, "best_epoch": best_epoch,
                "best_val_cider": best_cider if best_epoch else None, "out_path": str(out_path)}

    for epoch in range(start, epochs):
        t0 = time.time()
        epoch_seed = seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)                        # dropout
        gen = torch.Generator().manual_seed(epoch_seed + 1)  # shuffling and caption choice
        cur_lr = lr_at(epoch, lr, lr_decay_every, lr_decay_rate)
        for g in optimizer.param_groups:
            g["lr"] = cur_lr
        steps = data.num_batches("train", batch_size)
        if pruner is not None:
            pruner.on_epoch_start(decoder, epoch, steps)

        decoder.train()
        total, kd_total, n = 0.0, 0.0, 0
        bar = tqdm(data.batches("train", batch_size, shuffle=True, generator=gen),
                   total=steps, desc=f"{stage} epoch {epoch + 1}/{epochs}",
                   file=sys.stderr, disable=not progress, leave=False)
        for step, b in enumerate(bar):
            if pruner is not None:
                pruner.on_step(decoder, epoch, step, steps)
            b.labels = trim_padding(b.labels)  # on the host: finding the length needs no GPU sync
            b = to_device(b, device, pin_memory)
            seq = b.labels
            with mp.autocast():
                logprobs = decoder(b.fc, b.att, seq).float()
                teacher_logprobs = kd.logprobs(b.ids, seq).float() if kd is not None else None
            loss = sequence_loss(logprobs, seq)
            if kd is not None:
                kd_part = kd_loss(logprobs, teacher_logprobs, seq, kd_temperature)
                loss = (1 - kd_weight) * loss + kd_weight * kd_part
                kd_total += kd_part.item()
            optimizer_step(loss, decoder, optimizer, mp.scaler, grad_clip,
                           pruner.before_step if pruner is not None else None,
                           pruner.after_step if pruner is not None else None)
            total, n = total + loss.item(), n + 1
            bar.set_postfix(loss=f"{total / n:.3f}")

        caps = generate_captions(decoder, data, "val", beam_size, max_len, batch_size, device, progress, pin_memory)
        val_cider = cider_d(caps, refs_val, str(prepared_dir / "refs_val.json"))
        row = {"epoch": epoch + 1, "lr": cur_lr, "loss": total / max(n, 1), "val_cider": val_cider,
               "seconds": round(time.time() - t0, 3)}
        if kd is not None:
            row["kd_loss"] = kd_total / max(n, 1)
        sparsity = measured_sparsity(decoder) if pruner is not None else None
        if sparsity is not None:
            row["sparsity"] = sparsity["sparsity"]
        history.append(row)
        print(f"{stage} epoch {epoch + 1}/{epochs}: loss {total / max(n, 1):.4f}  val CIDEr-D {val_cider:.4f}  "
              + (f"sparsity {sparsity['sparsity']:.4f}  " if sparsity else "")
              + f"({time.time() - t0:.1f} s)", file=sys.stderr)

        eligible = pruner is None or pruner.at_target(epoch)
        if eligible and val_cider > best_cider:
            best_cider, best_epoch = val_cider, epoch + 1
            extra = {
                "stage": stage, "vocab_size": data.vocab_size, "feat_dim": data.feat_dim, "epoch": epoch + 1,
                "val_cider": val_cider, "itow": {str(k): w for k, w in sorted(data.itow.items())},
                **gpu_options,
            }
            if init_from is not None:
                extra["init_from"] = {"path": str(init_from), **settings["init_from"]}
            if pruner is not None:
                extra.update(sparsity, prune_method=pruner.method, prune_ratio=pruner.ratio)
            if kd is not None:
                extra.update(teacher={"path": str(teacher), "sha256": settings["kd"]["teacher_sha256"]},
                             kd_weight=kd_weight, kd_temperature=kd_temperature)
            save_decoder(decoder, best_path, extra)
        _save_resume(resume_path, decoder, optimizer, {
            "settings": settings, "epoch": epoch + 1, "history": history,
            "best_val_cider": best_cider, "best_epoch": best_epoch,
            **({"amp_scaler": mp.state()} if mp.active else {}),
        }, pruner)
        if log_json:
            write_json(log_json, report())

    _finish(out_path, best_epoch, keep_resume)
    if log_json:
        write_json(log_json, report())
    return report()
