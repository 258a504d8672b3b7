"""Encoder features (``features.h5``) as a store of rows: held in memory, or streamed from the file.

``features.h5`` holds "ids" int64 [N], "fc" float16 [N, C] and "att" float16 [N, HW, C], the
latter chunked one image per chunk. Two stores serve its rows with the same interface:

- ``MemoryFeatures`` reads the file once; a batch is then an in-memory gather. Right for the
  small datasets of the default experiment.
- ``H5Features`` keeps only the ids and shapes; each batch's rows are read from the file. At
  COCO scale (123k images x 7x7x2048 float16, about 25 GB) nothing else fits in memory. Its
  ``reads`` runs the reading in ``DataLoader`` worker processes, so the next batches are read
  while the model trains on this one.

Both give the same float32 values for the same rows (float16 on disk, converted per batch), so
a run's result does not depend on the store; only the rows' order comes from the caller, which
keeps all randomness (shuffling, caption choice) in the main process.

HDF5 handles must not cross a fork: each process opens its own handle on its first read, and a
process closes its handles just before it forks (``os.register_at_fork``), so DataLoader workers
never inherit one (the parent reopens on its next read).
"""
from __future__ import annotations

import os
import sys
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError

FEATURE_MODES = ("auto", "memory", "stream")
KEYS = ("ids", "fc", "att")
MB = 1 << 20

_open_stores: weakref.WeakSet = weakref.WeakSet()   # H5Features holding a handle in this process


def _close_all_before_fork() -> None:
    for store in list(_open_stores):
        store.close()


os.register_at_fork(before=_close_all_before_fork)


def open_h5(path: Path):
    import h5py

    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({e})") from None


def _check_layout(path: Path, f) -> tuple[int, int, int]:
    """(N, HW, C) of an open features file, or a ``UserError`` naming what is wrong."""
    missing = [k for k in KEYS if k not in f]
    if missing:
        raise UserError(f"{path}: missing dataset(s) {', '.join(missing)}")
    fc, att, ids = f["fc"].shape, f["att"].shape, f["ids"].shape
    if len(fc) != 2 or len(att) != 3 or att[2] != fc[1]:
        raise UserError(f"{path}: expected fc [N, C] and att [N, HW, C], got {tuple(fc)} and {tuple(att)}")
    if not (len(ids) == 1 and ids[0] == fc[0] == att[0]):
        raise UserError(f"{path}: ids {tuple(ids)}, fc {tuple(fc)} and att {tuple(att)} disagree on the image count")
    return int(att[0]), int(att[1]), int(att[2])


class MemoryFeatures:
    """The whole file in memory, float16 as stored: ``fc`` [N, C] and ``att`` [N, HW, C] tensors."""
    streaming = False

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_h5(self.path) as f:
            _check_layout(self.path, f)
            try:
                self.ids, fc, att = (f[k][()] for k in KEYS)
            except OSError as e:
                raise UserError(f"{self.path}: cannot read features ({e})") from None
        self.ids = self.ids.astype(np.int64)
        self.fc, self.att = torch.from_numpy(fc), torch.from_numpy(att)
        self.feat_dim = int(self.fc.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (fc [B, C], att [B, HW, C]) of ``rows``, in that order."""
        return self.fc[rows].float(), self.att[rows].float()

    def reads(self, row_batches: list[np.ndarray], workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``read`` of each row batch in turn (``workers`` is for the streaming store's signature)."""
        return (self.read(r) for r in row_batches)

    def fc_blocks(self) -> Iterator[np.ndarray]:
        """fc in file order, as the streaming store gives it (for hashing)."""
        yield self.fc.numpy()


class H5Features:
    """Rows read from the file on demand; only ids and shapes are held. Picklable (the handle is not).

    Memory per process stays flat over any number of batches: the read-in rows land in buffers
    reused from batch to batch, and a reader process writes its float32 output straight into
    shared memory. (Fresh per-batch temporaries, or an output that DataLoader moves to shared
    memory afterwards, leave heap memory that is not reused: a reader grew by a batch per batch.)
    """
    streaming = True

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handle, self._pid, self._buffers = None, None, {}
        with open_h5(self.path) as f:
            self.feat_dim = _check_layout(self.path, f)[2]
            self.ids = f["ids"][()].astype(np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": None, "_buffers": {}}

    def _file(self):
        """This process's handle, opened on first use (one inherited through a fork is never used)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open_h5(self.path), os.getpid()
            _open_stores.add(self)
        return self._handle

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle, self._pid = None, None
        _open_stores.discard(self)

    def _buffer(self, key: str, shape: tuple, dtype) -> torch.Tensor:
        """The first ``shape[0]`` rows of a reused buffer (grown when a batch is larger)."""
        b = self._buffers.get(key)
        if b is None or b.shape[0] < shape[0] or b.shape[1:] != shape[1:] or b.dtype != dtype:
            b = self._buffers[key] = np.empty(shape, dtype)
        return torch.from_numpy(b[:shape[0]])

    def _rows(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Rows of one dataset into a reused buffer; ``rows`` increasing and unique. Each run of
        consecutive rows is one slice read: h5py's fancy indexing is far slower (hundreds of ms for
        50 scattered rows)."""
        ds = self._file()[name]
        out = self._buffer(name, (len(rows), *ds.shape[1:]), ds.dtype)
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
            if b > a:
                out[a:b] = torch.from_numpy(ds[int(rows[a]):int(rows[b - 1]) + 1])
        return out

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (fc [B, C], att [B, HW, C]) of ``rows``, in that order: read in increasing row order
        (the file's, and what h5py needs), then put back in the asked order."""
        rows = np.asarray(rows, dtype=np.int64)
        uniq, back = np.unique(rows, return_inverse=True)
        in_reader = torch.utils.data.get_worker_info() is not None
        out = []
        for name in ("fc", "att"):
            try:
                src = self._rows(name, uniq)
            except (OSError, KeyError) as e:
                raise UserError(f"{self.path}: cannot read features ({e})") from None
            if not np.array_equal(uniq, rows):
                ordered = self._buffer(name + ".ordered", (len(rows), *src.shape[1:]), src.numpy().dtype)
                src = torch.index_select(src, 0, torch.from_numpy(back.reshape(-1)), out=ordered)
            dst = torch.empty(src.shape, dtype=torch.float32)
            out.append((dst.share_memory_() if in_reader else dst).copy_(src))
        return out[0], out[1]

    def reads(self, row_batches: list[np.ndarray], workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``read`` of each row batch in order; with ``workers`` > 0 in that many worker processes that
        read ahead (two batches each). The loader gets a generator of its own, so it draws nothing
        from torch's global RNG (which seeds dropout)."""
        if workers <= 0:
            yield from (self.read(r) for r in row_batches)
            return
        loader = torch.utils.data.DataLoader(_Reads(self, row_batches), batch_size=None, num_workers=workers,
                                             generator=torch.Generator())
        for out in loader:
            if isinstance(out, str):   # a worker's UserError, passed as its message
                raise UserError(out)
            yield out

    def fc_blocks(self, rows_per_block: int = 4096) -> Iterator[np.ndarray]:
        """fc in file order, a block of rows at a time (hashing it must not load it whole)."""
        with open_h5(self.path) as f:
            ds = f["fc"]
            for i in range(0, ds.shape[0], rows_per_block):
                yield ds[i:i + rows_per_block]


class _Reads(torch.utils.data.Dataset):
    """Item i: the features of ``row_batches[i]``, read in a worker. A ``UserError`` comes back as its
    message, so the main process raises it as the one-line error it is (DataLoader would wrap it
    in a worker traceback)."""

    def __init__(self, store: H5Features, row_batches: list[np.ndarray]):
        self.store, self.row_batches = store, row_batches

    def __len__(self) -> int:
        return len(self.row_batches)

    def __getitem__(self, i: int):
        try:
            return self.store.read(self.row_batches[i])
        except UserError as e:
            return str(e)


def choose_mode(path: str | Path, mode: str = "auto", memory_limit_mb: float = 4000) -> tuple[str, str]:
    """("memory" | "stream", why): ``auto`` streams a file larger than ``memory_limit_mb`` MiB."""
    if mode not in FEATURE_MODES:
        raise UserError(f"unknown features mode {mode!r}; known: {', '.join(FEATURE_MODES)}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    size = path.stat().st_size / MB
    if mode != "auto":
        return mode, f"{size:.0f} MiB, features: {mode}"
    mode = "stream" if size > memory_limit_mb else "memory"
    return mode, f"{size:.0f} MiB {'>' if mode == 'stream' else '<='} memory_limit_mb {memory_limit_mb:g}"


def open_features(path: str | Path, mode: str = "memory", memory_limit_mb: float = 4000,
                  workers: int = 0) -> MemoryFeatures | H5Features:
    """The store for ``path`` (``mode``: "auto", "memory" or "stream"); says on stderr which one and why.
    ``workers`` only goes into that line (the caller passes it to ``reads``)."""
    mode, why = choose_mode(path, mode, memory_limit_mb)
    how = ("in memory" if mode == "memory" else "streamed from disk, "
           + (f"{workers} reader process{'es' if workers > 1 else ''}" if workers > 0 else "read in this process"))
    print(f"features: {path} {how} ({why})", file=sys.stderr)
    return H5Features(path) if mode == "stream" else MemoryFeatures(path)
