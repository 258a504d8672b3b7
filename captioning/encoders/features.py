"""Encode every image of a dataset once, so decoders train on cached features.

The HDF5 file holds ``ids`` (int64 [N], in images_json order), ``fc`` (float16 [N, C]) and
``att`` (float16 [N, H*W, C]); attrs ``timm_name``, ``img_size``, ``feat_dim``. float16 halves the disk
and is exact enough for a decoder's input. Images go through ``load_tensor`` with the encoder's own size
and normalisation: the same path a raw image takes at evaluation, so cached and live features agree.

At COCO scale one job is too slow, so extraction can be split: ``extract_features(..., shard=(i, n))``
writes the contiguous rows [i*N//n, (i+1)*N//n) to a file of the same layout with ``shard_*`` attrs, and
``merge_features`` checks the n files belong together and copies them into one file equal to the
unsharded one (the shard attrs dropped).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
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


# Attrs only shard files carry: where the shard sits in its extraction, and a digest of what was
# extracted (encoder config and weights, the whole image list), so shards of another run never merge.
SHARD_ATTRS = ("shard_index", "shard_count", "shard_first_row", "shard_total_rows", "shard_source")
MERGE_BLOCK_BYTES = 64 * 2**20  # rows copied at once by merge_features: memory stays flat in N


def shard_rows(total: int, shard: tuple[int, int], where: str = "images") -> tuple[int, int]:
    """Rows [first, end) of shard ``(i, n)`` of ``total``: contiguous, so merging is concatenation."""
    i, n = shard
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (i, n)) or n < 1 or not 0 <= i < n:
        raise UserError(f"{where}: shard {i} of {n}: needs 0 <= index < count")
    if n > total:
        raise UserError(f"{where}: {n} shards of {total} images: at most one shard per image")
    return i * total // n, (i + 1) * total // n


def _source_digest(encoder, items: list[dict]) -> str:
    """sha256 of the encoder (config, weights) and the full image list: equal for every shard of one run."""
    h = hashlib.sha256(json.dumps([encoder.config(), items], sort_keys=True).encode())
    for k, t in sorted(encoder.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
@model_work
def extract_features(encoder, images_json, image_root, out_h5, batch_size: int = 32, device: str = "auto",
                     shard: tuple[int, int] | None = None) -> None:
    """Write the features of every image in ``images_json`` (paths relative to ``image_root``) to ``out_h5``.

    ``shard=(i, n)``: only rows ``shard_rows(N, (i, n))``, with the ``SHARD_ATTRS`` that ``merge_features``
    needs to put the n files back together.
    """
    import h5py

    items = read_images_json(images_json)
    if not items:
        raise UserError(f"{images_json}: no images listed")
    root = Path(image_root)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    first, end = (0, len(items)) if shard is None else shard_rows(
        len(items), shard, str(images_json) if isinstance(images_json, (str, Path)) else "images list")
    source = None if shard is None else _source_digest(encoder, items)
    rows = items[first:end]
    paths = [root / it["file_path"] for it in rows]
    n = len(rows)
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=torch.tensor([it["id"] for it in rows], dtype=torch.int64).numpy())
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
        if shard is not None:
            for k, v in zip(SHARD_ATTRS, (shard[0], shard[1], first, len(items), source)):
                f.attrs[k] = v


def _same(a, b) -> bool:
    return type(a) is type(b) and np.array_equal(a, b)


def _show(v) -> str:
    return repr(v.item() if isinstance(v, np.generic) else v)


def _open_shard(stack, path):
    """An open shard file, checked on its own: shard attrs, the three datasets, rows that agree."""
    import h5py

    if not Path(path).is_file():
        raise UserError(f"{path}: shard file not found")
    try:
        f = stack.enter_context(h5py.File(path, "r"))
    except OSError as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable HDF5 file ({why})") from None
    missing = [k for k in SHARD_ATTRS if k not in f.attrs]
    if missing:
        raise UserError(f"{path}: not a features shard (no attr {missing[0]}; written by extract --shard?)")
    for k in ("ids", "fc", "att"):
        if not isinstance(f.get(k), h5py.Dataset):
            raise UserError(f"{path}: no dataset '{k}'")
    if f["ids"].ndim != 1 or f["fc"].ndim != 2 or f["att"].ndim != 3:
        raise UserError(f"{path}: ids, fc, att must be 1-, 2- and 3-dimensional")
    if not f["ids"].shape[0] == f["fc"].shape[0] == f["att"].shape[0]:
        raise UserError(f"{path}: ids, fc and att have different row counts")
    return f


def merge_features(shard_paths, out_h5) -> None:
    """Merge the shard files of one extraction into ``out_h5``, equal to the unsharded file.

    Every shard must come from the same extraction (same source digest, encoder attrs, total and
    shard count, trailing shapes and dtypes), each index exactly once, rows contiguous and covering all
    rows; any problem is a one-line ``UserError`` naming the file. Rows are copied in blocks of at
    most ``MERGE_BLOCK_BYTES`` (never a whole dataset), and ``out_h5`` appears only when complete.
    """
    import h5py

    shard_paths = [str(p) for p in shard_paths]
    if not shard_paths:
        raise UserError(f"{out_h5}: no shard files to merge")
    with contextlib.ExitStack() as stack:
        files = {}  # shard index -> (path, open file)
        ref_path, ref = None, None
        for path in shard_paths:
            f = _open_shard(stack, path)
            if ref is None:
                ref_path, ref = path, f
            # the encoder's attrs first: they make the clearest message
            enc_attrs = ["timm_name", "img_size", "feat_dim"]
            rest = sorted((set(f.attrs) | set(ref.attrs)) - set(enc_attrs) - set(SHARD_ATTRS))
            for k in enc_attrs + rest + ["shard_count", "shard_total_rows", "shard_source"]:
                if not _same(f.attrs.get(k), ref.attrs.get(k)):
                    why = ("other encoder weights or image list" if k == "shard_source" else
                           f"{_show(f.attrs.get(k))} vs {_show(ref.attrs.get(k))}")
                    raise UserError(f"{path}: not from the same extraction as {ref_path} (attr {k} differs: {why})")
            for k in ("ids", "fc", "att"):
                if f[k].dtype != ref[k].dtype or f[k].shape[1:] != ref[k].shape[1:]:
                    raise UserError(f"{path}: dataset {k} is {f[k].dtype} {f[k].shape[1:]} per row, "
                                    f"{ref_path} has {ref[k].dtype} {ref[k].shape[1:]}")
            i = int(f.attrs["shard_index"])
            if not 0 <= i < int(f.attrs["shard_count"]):
                raise UserError(f"{path}: shard index {i} outside 0..{int(f.attrs['shard_count']) - 1}")
            if i in files:
                raise UserError(f"{path}: shard {i} given twice (also {files[i][0]})")
            files[i] = (path, f)
        count, total = int(ref.attrs["shard_count"]), int(ref.attrs["shard_total_rows"])
        missing = sorted(set(range(count)) - set(files))
        if missing:
            raise UserError(f"{ref_path}: its extraction has {count} shards, shard {missing[0]} is missing "
                            f"from the {len(files)} given")
        row = 0
        for i in range(count):
            path, f = files[i]
            if int(f.attrs["shard_first_row"]) != row:
                raise UserError(f"{path}: shard {i} starts at row {int(f.attrs['shard_first_row'])}, expected {row}")
            row += f["ids"].shape[0]
        if row != total:
            raise UserError(f"{ref_path}: the shards hold {row} rows, their extraction has {total}")

        fc_row, att_row = ref["fc"].shape[1:], ref["att"].shape[1:]
        block = max(1, MERGE_BLOCK_BYTES // (ref["att"].dtype.itemsize * int(np.prod(att_row)) or 1))
        with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as out:
            # the same layout extract_features writes: ids and fc contiguous, att one chunk per image
            out.create_dataset("ids", (total,), dtype=ref["ids"].dtype)
            out.create_dataset("fc", (total, *fc_row), dtype=ref["fc"].dtype)
            out.create_dataset("att", (total, *att_row), dtype=ref["att"].dtype, chunks=(1, *att_row))
            for i in range(count):
                f = files[i][1]
                first, n = int(f.attrs["shard_first_row"]), f["ids"].shape[0]
                for lo in range(0, n, block):
                    hi = min(n, lo + block)
                    for k in ("ids", "fc", "att"):
                        out[k][first + lo:first + hi] = f[k][lo:hi]
            for k, v in ref.attrs.items():
                if k not in SHARD_ATTRS:
                    out.attrs[k] = v
