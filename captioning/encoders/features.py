"""Encode every image of a dataset once, so decoders train on cached features.

The HDF5 file holds ``ids`` (int64 [N], in images_json order), ``fc`` (float16 [N, C]) and
``att`` (float16 [N, H*W, C]); attrs ``timm_name``, ``img_size``, ``feat_dim``. float16 halves the disk
and is exact enough for a decoder's input. Images go through ``load_tensor`` with the encoder's own size
and normalisation: the same path a raw image takes at evaluation, so cached and live features agree.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.images import load_tensor
from ..errors import UserError
from ..io import atomic_path, read_json
from ..timing import model_work
from ..utils import pick_device


def read_images_json(images_json) -> list[dict]:
    """The image list [{"id", "file_path", "split"}, ...] from a path (or an already loaded list)."""
    where = str(images_json) if isinstance(images_json, (str, Path)) else "images list"
    items = read_json(images_json) if isinstance(images_json, (str, Path)) else images_json
    if not isinstance(items, list):
        raise UserError(f"{where}: expected a JSON list of images")
    for n, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("id"), int) or not isinstance(it.get("file_path"), str):
            raise UserError(f"{where}: entry {n} needs an integer 'id' and a string 'file_path'")
    return items


def _load_batch(encoder, paths, pool) -> torch.Tensor:
    load = lambda p: load_tensor(p, encoder.img_size, encoder.mean, encoder.std)  # noqa: E731
    return torch.stack(list(pool.map(load, paths)))


@torch.no_grad()
def encode_images(encoder, paths, device: str = "auto", batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(fc [N, C], att [N, H*W, C]) float32 on CPU for image files, in eval mode."""
    device = pick_device(device)
    encoder.eval().to(device)
    fcs, atts = [], []
    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decoding releases the GIL
        for i in range(0, len(paths), batch_size):
            fc, att = encoder(_load_batch(encoder, paths[i:i + batch_size], pool).to(device))
            fcs.append(fc.float().cpu())
            atts.append(att.float().cpu())
    if not fcs:
        raise UserError("no images to encode")
    return torch.cat(fcs), torch.cat(atts)


@torch.no_grad()
@model_work
def extract_features(encoder, images_json, image_root, out_h5, batch_size: int = 32, device: str = "auto") -> None:
    """Write the features of every image in ``images_json`` (paths relative to ``image_root``) to ``out_h5``."""
    import h5py

    items = read_images_json(images_json)
    if not items:
        raise UserError(f"{images_json}: no images listed")
    root = Path(image_root)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    paths = [root / it["file_path"] for it in items]
    n = len(items)
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=torch.tensor([it["id"] for it in items], dtype=torch.int64).numpy())
        fc_ds = att_ds = None
        for i in tqdm(range(0, n, batch_size), desc=f"features {encoder.timm_name}", unit="batch"):
            fc, att = encode_images(encoder, paths[i:i + batch_size], device, batch_size)
            if fc_ds is None:  # the grid size is known after the first batch
                fc_ds = f.create_dataset("fc", (n, fc.shape[1]), dtype="float16")
                att_ds = f.create_dataset("att", (n, *att.shape[1:]), dtype="float16",
                                          chunks=(1, *att.shape[1:]))
            fc_ds[i:i + len(fc)] = fc.half().numpy()
            att_ds[i:i + len(att)] = att.half().numpy()
        f.attrs["timm_name"] = encoder.timm_name
        f.attrs["img_size"] = encoder.img_size
        f.attrs["feat_dim"] = encoder.feat_dim
