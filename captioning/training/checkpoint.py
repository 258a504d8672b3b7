"""The files of a training run: the starting decoder, the resume file, the best epoch, the output.

Kill-safety: ``out_path`` is written once, when training ends, because Snakemake deletes the
declared output of a killed job before rerunning it, and because a file there mid-run would look
done. Until then two undeclared siblings hold the run (``run_files``): after every epoch
``<out_path>.resume.safetensors`` gets the model, Adam's state, the epoch, the best score and the
history, and ``<out_path>.best.safetensors`` the best epoch so far. A new call with the same
settings continues from them.

``finish`` publishes the best file as a hard link (no second copy on disk) and shrinks the resume
file to a tensor-free "finished" record. Both stay: SLURM can record a job that exited 0 as TIMEOUT
(it checks limits every 30 s), and Snakemake then deletes the output and reruns the job. The rerun
finds the record and publishes the same file again instead of training from epoch 1.

The resume file holds tensors only (model, optimizer moments, pruning masks) plus JSON metadata:
nothing is pickled.
"""
from __future__ import annotations

import hashlib
import os
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


def _resume_problem(meta: dict, settings: dict, best_path: Path, stop: dict) -> str | None:
    """Why a resume file cannot be continued from, or None when it can.

    Besides the settings, the best checkpoint it names must still be there: a kill between
    writing the best file and the resume file leaves them one epoch apart, so the epochs must agree.
    A finished record holds no weights to train on, so it is used only by a run that would stop
    where it stopped: same ``stop`` (epochs, patience).
    """
    if meta.get("format") != RESUME_FORMAT or meta.get("settings") != settings:
        return "made with other settings"
    if meta.get("finished") and meta.get("stop") != stop:
        return f"a finished run with {meta.get('stop')}, not {stop}"
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


def resume_if_possible(who: str, out_path: Path, settings: dict, stop: dict, decoder, optimizer, mp,
                       mask=None) -> dict | None:
    """Load a matching resume file into decoder, optimizer, amp scaler (and ``mask``); return its metadata.

    None when there is nothing usable to resume from (a damaged or mismatched file says why on
    stderr, and training starts over). A finished record loads nothing: its metadata says the
    run is over, and ``finish`` publishes its best file again.
    """
    resume_path, best_path = run_files(out_path)
    try:  # the metadata alone: the tensors are read only when the file is used
        meta = read_decoder_meta(resume_path) if resume_path.is_file() else None
    except UserError:
        meta = None  # a damaged resume file is ignored
    if meta is None:
        return None
    problem = _resume_problem(meta, settings, best_path, stop)
    if problem:
        print(f"{who}: ignoring {resume_path} ({problem}); starting over", file=sys.stderr)
        return None
    if meta.get("finished"):
        print(f"{who}: {out_path} finished after epoch {int(meta['epoch'])} already; publishing it again",
              file=sys.stderr)
        return meta
    meta = load_resume(resume_path, decoder, optimizer, mask)
    mp.load_state(meta.get("amp_scaler"), resume_path)
    print(f"{who}: resuming {out_path} after epoch {int(meta['epoch'])}", file=sys.stderr)
    return meta


def finish(out_path: Path, best_epoch: int, keep_resume: bool, record: dict) -> None:
    """Publish the best checkpoint at ``out_path`` (atomically); then, unless the run files are
    kept whole, replace the resume file by a finished ``record`` (its metadata, no tensors).

    The output is a hard link to the best file (a copy where links fail), so the best file stays
    at no cost in disk; the resume file is replaced last, so a kill in between leaves a run that
    resumes after its final epoch and finishes again.
    """
    resume_path, best_path = run_files(out_path)
    if best_epoch:
        with atomic_path(out_path) as tmp:
            tmp.unlink()
            try:
                os.link(best_path, tmp)
            except OSError:
                shutil.copyfile(best_path, tmp)
    if not keep_resume:
        save_tensors(resume_path, {}, {**record, "format": RESUME_FORMAT, "finished": True})


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
