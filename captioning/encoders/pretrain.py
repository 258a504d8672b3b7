"""In-domain encoder pretraining for when no ImageNet weights exist for a backbone.

The encoder learns to name the objects in each image (multi-label: BCE on a linear head over ``fc``),
which is what a captioner needs its features to carry. The head is thrown away afterwards.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..data.images import load_rgb
from ..errors import UserError
from ..io import read_json
from ..timing import model_work
from ..utils import pick_device, seed_everything
from .features import read_images_json


def _read_labels(objects_json) -> tuple[int, dict[int, list[int]]]:
    where = str(objects_json)
    obj = read_json(objects_json)
    if not (isinstance(obj, dict) and isinstance(obj.get("label_names"), list) and isinstance(obj.get("images"), list)):
        raise UserError(f"{where}: expected {{'label_names': [...], 'images': [...]}}")
    n_labels = len(obj["label_names"])
    labels = {}
    for n, it in enumerate(obj["images"]):
        if not isinstance(it, dict) or not isinstance(it.get("cocoid"), int) or not isinstance(it.get("labels"), list):
            raise UserError(f"{where}: images[{n}] needs an integer 'cocoid' and a list 'labels'")
        if not all(isinstance(k, int) and 0 <= k < n_labels for k in it["labels"]):
            raise UserError(f"{where}: images[{n}] has a label outside 0..{n_labels - 1}")
        labels[it["cocoid"]] = it["labels"]
    if n_labels == 0:
        raise UserError(f"{where}: 'label_names' is empty")
    return n_labels, labels


def _load_split(items, root: Path, size: int, labels: dict, n_labels: int):
    """All images of a split in memory as uint8 [N, 3, S, S] (4x smaller than float) with multi-hot targets."""
    pix = np.zeros((len(items), size, size, 3), dtype=np.uint8)
    y = torch.zeros(len(items), n_labels)
    for n, it in enumerate(tqdm(items, desc="load images", unit="img", leave=False)):
        # same resize as captioning.data.images.to_tensor; normalisation happens per batch
        pix[n] = np.asarray(load_rgb(root / it["file_path"], size).resize((size, size), Image.BILINEAR))
        y[n, labels.get(it["id"], [])] = 1.0
    return torch.from_numpy(pix).permute(0, 3, 1, 2).contiguous(), y


def _normalise(pix: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=pix.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=pix.device).view(1, 3, 1, 1)
    return (pix.float() / 255.0 - m) / s


def _micro_f1(logits: torch.Tensor, y: torch.Tensor) -> float:
    pred = logits > 0
    tp = (pred & (y > 0)).sum().item()
    denom = pred.sum().item() + (y > 0).sum().item()
    return 2 * tp / denom if denom else 1.0


@model_work
def pretrain(encoder, objects_json, images_json, image_root, epochs: int = 2, batch_size: int = 32,
             lr: float = 1e-3, seed: int = 0, device: str = "auto", patience: int | None = None,
             img_size: int | None = None) -> dict:
    """Train ``encoder`` in place as a multi-label object classifier on the "train" split.

    ``patience``: stop once validation F1 has not risen for that many epochs in a row, and keep the
    best epoch's weights, so the big baseline is pretrained to its plateau (``epochs`` is the most
    it runs). ``img_size``: pretrain at this side instead of the encoder's own (a CNN takes any size):
    at half the side an epoch costs about a quarter, so more epochs fit the same time.
    Returns ``{"epochs": [{"loss": mean train BCE, "val_f1": micro-F1 on "val" or None}, ...],
    "best_epoch": 1-based epoch whose weights were kept}``. The encoder ends in eval mode on CPU,
    ready for ``save_encoder``.
    """
    seed_everything(seed)
    device = pick_device(device)
    n_labels, labels = _read_labels(objects_json)
    items = read_images_json(images_json)
    root = Path(image_root)
    train = [it for it in items if it.get("split") == "train"]
    val = [it for it in items if it.get("split") == "val"]
    if not train:
        raise UserError(f"{images_json}: no images in the 'train' split to pretrain on")
    if patience is not None and not val:
        raise UserError(f"pretrain.patience needs validation F1, but {images_json} has no 'val' images")
    if img_size and img_size != encoder.img_size and encoder.fixed_input_size:
        raise UserError(f"pretrain.img_size {img_size}: {encoder.timm_name} takes only its own size "
                        f"{encoder.img_size} (fixed input size)")
    size = img_size or encoder.img_size
    x_train, y_train = _load_split(train, root, size, labels, n_labels)
    x_val, y_val = _load_split(val, root, size, labels, n_labels)

    encoder.to(device)
    head = nn.Linear(encoder.feat_dim, n_labels).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    history, best, best_state = [], -1.0, None
    for epoch in range(epochs):
        encoder.train()
        order = torch.randperm(len(train), generator=gen)
        total, seen = 0.0, 0
        bar = tqdm(range(0, len(train), batch_size), desc=f"pretrain epoch {epoch + 1}/{epochs}", unit="batch")
        for i in bar:
            idx = order[i:i + batch_size]
            if len(idx) < 2 and len(train) >= 2:  # a batch of one breaks BatchNorm statistics
                continue
            x = _normalise(x_train[idx].to(device), encoder.mean, encoder.std)
            flip = torch.rand(len(idx), generator=gen) < 0.5  # light augmentation: horizontal flips
            x[flip.to(device)] = x[flip.to(device)].flip(-1)
            loss = loss_fn(head(encoder(x)[0]), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        val_f1 = _evaluate(encoder, head, x_val, y_val, batch_size, device)
        history.append({"loss": total / max(seen, 1), "val_f1": val_f1})
        print(f"pretrain epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.4f}  val F1 {val_f1}", flush=True)
        if patience is None or val_f1 is None:
            continue
        if val_f1 > best:
            best, best_epoch = val_f1, epoch
            best_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    if best_state is not None:
        encoder.load_state_dict(best_state)
    encoder.eval().cpu()
    return {"epochs": history, "best_epoch": (best_epoch if best_state is not None else len(history) - 1) + 1}


@torch.no_grad()
def _evaluate(encoder, head, x, y, batch_size, device) -> float | None:
    if len(x) == 0:
        return None
    encoder.eval()
    logits = [head(encoder(_normalise(x[i:i + batch_size].to(device), encoder.mean, encoder.std))[0]).cpu()
              for i in range(0, len(x), batch_size)]
    return _micro_f1(torch.cat(logits), y)
