"""The files of a training run: the starting decoder, the resume file, the best epoch, the output.

Kill-safety: ``out_path`` is written once, when training ends, because Snakemake deletes the
declared output of a killed job before rerunning it, and because a file there mid-run would look
done. Until then two undeclared siblings hold the run (``run_files``): after every epoch
``<out_path>.resume.safetensors`` gets the model, Adam's state, the epoch, the best score and the
history, and ``<out_path>.best.safetensors`` the best epoch so far. A new call with the same
settings continues from them. ``finish`` publishes the best file and deletes both siblings.

The resume file holds tensors only (model, optimizer moments, pruning masks) plus JSON metadata:
nothing is pickled.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_path, load_tensors, save_tensors
from ..models import load_decoder, read_decoder_meta
from .loader import CaptionData

RESUME_FORMAT = "captioning.xe-resume/1"


def run_files(out_path) -> tuple[Path, Path]:
    """(resume file, best-so-far checkpoint): the siblings of ``out_path`` that hold an unfinished run."""
    return Path(f"{out_path}.resume.safetensors"), Path(f"{out_path}.best.safetensors")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_identity(path) -> dict:
    """What names a starting checkpoint in settings: its hash and size, not its path."""
    return {"sha256": file_sha256(path), "bytes": Path(path).stat().st_size}


# ---- resume file -------------------------------------------------------------------------------

def save_resume(path: Path, decoder, optimizer, meta: dict, mask=None) -> None:
    """Model and Adam state as tensors (plus ``mask``'s, if it keeps any), everything else as JSON."""
    tensors = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    if mask is not None:
        tensors.update({f"pruner.{k}": v for k, v in mask.state_tensors().items()})
    scalars: dict[str, dict] = {}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = v
            else:
                scalars.setdefault(str(i), {})[k] = v
    save_tensors(path, tensors, {**meta, "format": RESUME_FORMAT, "optim_scalars": scalars})


def load_resume(path: Path, decoder, optimizer, mask=None) -> dict:
    tensors, meta = load_tensors(path)
    decoder.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if mask is not None:
        mask.load_state_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("pruner.")}, decoder)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    for i, st in meta.get("optim_scalars", {}).items():
        state.setdefault(int(i), {}).update(st)
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return meta


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


def resume_if_possible(who: str, out_path: Path, settings: dict, decoder, optimizer, mp, mask=None) -> dict | None:
    """Load a matching resume file into decoder, optimizer, amp scaler (and ``mask``); return its metadata.

    None when there is nothing usable to resume from (a damaged or mismatched file says why on
    stderr, and training starts over).
    """
    resume_path, best_path = run_files(out_path)
    try:  # the metadata alone: the tensors are read only when the file is used
        meta = read_decoder_meta(resume_path) if resume_path.is_file() else None
    except UserError:
        meta = None  # a damaged resume file is ignored
    if meta is None:
        return None
    problem = _resume_problem(meta, settings, best_path)
    if problem:
        print(f"{who}: ignoring {resume_path} ({problem}); starting over", file=sys.stderr)
        return None
    meta = load_resume(resume_path, decoder, optimizer, mask)
    mp.load_state(meta.get("amp_scaler"), resume_path)
    print(f"{who}: resuming {out_path} after epoch {int(meta['epoch'])}", file=sys.stderr)
    return meta


def finish(out_path: Path, best_epoch: int, keep_resume: bool) -> None:
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

def decoder_from_checkpoint(path, decoder_name: str | None, decoder_cfg: dict, data: CaptionData, device: str):
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
    if "itow" in meta and meta["itow"] != data.itow_json():
        raise UserError(f"{path}: its vocabulary differs from the prepared dataset's vocab.json")
    return decoder
