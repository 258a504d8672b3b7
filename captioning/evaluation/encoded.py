"""The encoder's outputs on the test images, computed once for every variant that shares the encoder.

Most variants of a family differ only in their decoder (pruning, distillation, SCST), and the
encoder is most of what captioning costs (lite0: about 11 of 17 ms per image here; resnet50: 42).
A ``pack`` job therefore looks its encoder up by what determines its outputs, bit for bit:

- the encoder's config and stored tensors, the quantization mode it runs in, the device;
- the images (their bytes), in order, and the batch size (int8 and batched convolutions may
  round differently in other batches);
- the torch version.

Outputs are kept in HDF5 in the encoder's own dtype, written and read batch by batch, so memory
stays one batch deep at COCO's 5,000 images, and the decoder sees exactly the tensors the encoder
would give it again. A file that is unreadable or of the wrong shape is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ..io import atomic_path

FORMAT = "captioning.encoded/1"


def encoder_key(captioner, paths, batch_size: int) -> str:
    """sha256 of everything that decides the encoder's outputs on ``paths`` (see the module doc)."""
    h = hashlib.sha256()
    head = {"format": FORMAT, "torch": torch.__version__, "device": str(captioner.device),
            "quantization": captioner.quantization, "encoder": captioner.encoder.config(), "batch_size": batch_size}
    h.update(json.dumps(head, sort_keys=True).encode())
    for name, t in sorted(captioner.state_groups()["encoder"].items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()


def _read(path: Path, n: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
    """Batches of a cached file, or None when it is missing, unreadable or not for ``n`` images."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        return None
    try:
        ok = (f.attrs.get("format") == FORMAT and "fc" in f and "att" in f
              and f["fc"].shape[0] == f["att"].shape[0] == n and f.attrs.get("complete", False))
    except (OSError, KeyError, TypeError):
        ok = False
    if not ok:
        f.close()
        return None

    def batches():
        with f:
            for i in range(0, n, batch_size):
                yield torch.from_numpy(f["fc"][i:i + batch_size]), torch.from_numpy(f["att"][i:i + batch_size])
    return batches()


def _compute(captioner, paths, batch_size: int, path: Path | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Encode ``paths`` batch by batch, yielding each batch and (with ``path``) writing it there."""
    import h5py

    def encode(i):
        with torch.no_grad():
            fc, att = captioner.encoder(captioner.images(paths[i:i + batch_size]).to(captioner.device))
        return fc.cpu(), att.cpu()

    if path is None:
        for i in range(0, len(paths), batch_size):
            yield encode(i)
        return
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        for i in range(0, len(paths), batch_size):
            fc, att = encode(i)
            if i == 0:
                for name, t in (("fc", fc), ("att", att)):
                    f.create_dataset(name, (len(paths), *t.shape[1:]), t.numpy().dtype,
                                     chunks=(min(batch_size, len(paths)), *t.shape[1:]))
            f["fc"][i:i + len(fc)], f["att"][i:i + len(att)] = fc.numpy(), att.numpy()
            yield fc, att
        f.attrs["complete"] = True  # set last: only a file written to the end is ever read


def encoded_batches(captioner, paths, batch_size: int, cache_dir=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fc, att) of ``paths`` in batches of ``batch_size``: from ``cache_dir`` when an identical encoder
    wrote them there, else computed (and written there for the next variant)."""
    paths = list(paths)
    if cache_dir is None or not paths:
        return _compute(captioner, paths, batch_size, None)
    path = Path(cache_dir) / f"{encoder_key(captioner, paths, batch_size)}.h5"
    cached = _read(path, len(paths), batch_size)
    if cached is not None:
        print(f"encoder outputs: reused {path}", file=sys.stderr)
        return cached
    print(f"encoder outputs: computing {path}", file=sys.stderr)
    return _compute(captioner, paths, batch_size, path)
