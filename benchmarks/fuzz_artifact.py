"""Fuzz the .capz loader: every mutant of a valid artifact must load into a model that captions,
or fail with one ``UserError``. Anything else (another exception, a MemoryError) is a finding.

Mutants are made from three tiny valid artifacts (fp32 with sparse tensors, fp16, int8 with sparse
int8 tensors): bit flips in the prefix, in the zstd frame, in the header JSON and in the tensor bytes;
truncations; header fields set to huge, negative, zero or wrong-typed values, deleted or swapped; a
wrong header length. All but the prefix flips and file truncations are sealed again with a fresh
checksum, so they reach the decoder instead of stopping at the checksum.

The campaign runs in this process under an address-space limit (``resource.RLIMIT_AS``: the size
after imports plus ``--mem-mb``), so an allocation bomb fails here with a MemoryError instead of
exhausting the machine. It checks first that the limit bites. It prints one JSON line: mutants
tried, loaded and refused, peak memory, and the findings.

    python benchmarks/fuzz_artifact.py [--mutants 300] [--seconds S] [--seed 0] [--mem-mb 512]

``tests/test_fuzz_artifact.py`` runs a short campaign in CI; run a longer one with more ``--mutants``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from captioning.captioner import Captioner, load_captioner, pack_model  # noqa: E402
from captioning.compress import artifact  # noqa: E402
from captioning.errors import UserError  # noqa: E402

VOCAB = 20
IMG = 32
HOSTILE = [2**63, 2**40, 2**31, 10**12, -1, -2**40, 0, 1, 3, 1.5, float("nan"), float("inf"), True, False,
           None, "", "x", "float64", "int64", "sparse_int8", "<f8", "|u1", "vit_giant_patch14_224", [], [1], [-1, 2], [[[[]]]], {}, {"a": 1}]


# ---------------------------------------------------------------- seed artifacts


def seed_artifacts(folder: Path) -> list[bytes]:
    """Three tiny valid artifacts (fp32 pruned, fp16, int8 pruned) as file bytes."""
    from captioning.encoders import create_encoder
    from captioning.models import create_decoder

    torch.manual_seed(0)
    enc = create_encoder("test_efficientnet", img_size=IMG)
    dec = create_decoder("updown", vocab_size=VOCAB, feat_dim=enc.feat_dim, input_encoding_size=16,
                         rnn_size=16, att_hid_size=7)  # 7: a pruned tensor whose mask has padding bits
    with torch.no_grad():
        for p in dec.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    pruned = copy.deepcopy(dec)
    with torch.no_grad():
        for p in pruned.parameters():
            if p.ndim > 1:
                p[p.abs() < p.abs().flatten().kthvalue(int(0.7 * p.numel())).values] = 0
    itow = {i: f"w{i}" for i in range(1, VOCAB + 1)}
    out = []
    for name, d, mode in (("fp32", pruned, "fp32"), ("fp16", dec, "fp16"), ("int8", pruned, "int8")):
        path = folder / f"seed-{name}.capz"
        pack_model(path, enc, d, itow, max_length=8, quantization=mode)
        out.append(path.read_bytes())
    return out


def unseal(data: bytes) -> bytes:
    """The raw body of a valid artifact (trusted: only our own seeds go through here)."""
    import zstandard

    return zstandard.ZstdDecompressor().decompress(data[artifact._PREFIX.size:])


def split_raw(raw: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack_from("<I", raw)
    return json.loads(raw[4:4 + hlen]), raw[4 + hlen:]


def join_raw(header, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<I", len(h)) + h + payload


# ---------------------------------------------------------------- mutations


def _flip(b: bytearray, lo: int, hi: int, rng: random.Random, n: int) -> bytearray:
    for _ in range(n):
        if hi > lo:
            b[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return b


def _paths(node, path=()):
    """Every (path) to a value inside a JSON tree, containers included."""
    yield path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, path + (k,))


def _parent(tree, path):
    for k in path[:-1]:
        tree = tree[k]
    return tree


def _mutate_field(header: dict, rng: random.Random) -> str:
    """Set, delete or swap one value of the header (tensor index or config) in place; say what."""
    area = header["tensors"] if rng.random() < 0.6 else header["config"]
    paths = [p for p in _paths(area) if p]
    path = rng.choice(paths)
    parent, key = _parent(area, path), path[-1]
    op = rng.random()
    if op < 0.1 and isinstance(parent, dict):
        del parent[key]
        return f"delete {path}"
    if op < 0.2 and isinstance(parent, list) and len(parent) > 1:
        j = rng.randrange(len(parent))
        parent[key], parent[j] = parent[j], parent[key]
        return f"swap {path} with [{j}]"
    value = rng.choice(HOSTILE)
    if isinstance(parent[key], int) and not isinstance(parent[key], bool) and rng.random() < 0.3:
        value = parent[key] + rng.choice([-1, 1, 8, 1 << 20])  # near misses: off by one, a byte, a lot
    parent[key] = value
    return f"set {path} = {value!r}"


def mutant(seed: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutant of a seed artifact's bytes, and a description of it."""
    pre = artifact._PREFIX.size
    kind = rng.choice(["prefix", "zstd", "header-bits", "payload-bits", "field", "field", "field",
                       "truncate-file", "truncate-raw", "header-length"])
    if kind == "prefix":
        return bytes(_flip(bytearray(seed), 0, pre, rng, 1)), kind
    if kind == "truncate-file":
        return seed[:rng.randrange(len(seed))], kind
    if kind == "zstd":
        body = bytes(_flip(bytearray(seed[pre:]), 0, len(seed) - pre, rng, rng.randint(1, 3)))
        import hashlib

        prefix = artifact._PREFIX.pack(artifact.MAGIC, artifact.FORMAT_VERSION, len(body),
                                       hashlib.sha256(body).digest())
        return prefix + body, kind
    raw = unseal(seed)
    (hlen,) = struct.unpack_from("<I", raw)
    if kind == "header-bits":
        raw = bytes(_flip(bytearray(raw), 4, 4 + hlen, rng, rng.randint(1, 3)))
    elif kind == "payload-bits":
        raw = bytes(_flip(bytearray(raw), 4 + hlen, len(raw), rng, rng.randint(1, 8)))
    elif kind == "truncate-raw":
        raw = raw[:rng.randrange(len(raw))]
    elif kind == "header-length":
        value = rng.choice([0, 1, hlen - 1, hlen + 1, len(raw), 2**32 - 1, rng.randrange(2**32)])
        raw = struct.pack("<I", value) + raw[4:]
        kind += f" {value}"
    else:
        header, payload = split_raw(raw)
        kind = _mutate_field(header, rng)
        raw = join_raw(header, payload)
    return artifact.seal(raw), kind


# ---------------------------------------------------------------- the campaign


def _status(key: str) -> int:
    """A /proc/self/status value in bytes (VmSize, VmHWM, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def limit_memory(extra_mb: int) -> int:
    """Cap this process's address space at its size now plus ``extra_mb``; returns the cap in bytes.
    Checks that the cap bites: a larger allocation must raise MemoryError."""
    cap = _status("VmSize") + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        bytearray((extra_mb + 64) * 2**20)
    except MemoryError:
        return cap
    raise RuntimeError("the address-space limit does not bite on this machine")


def campaign(mutants: int, seconds: float, seed: int, mem_mb: int) -> dict:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    image = torch.rand(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))
    counts = {"tried": 0, "loaded": 0, "refused": 0}
    kinds: dict[str, int] = {}
    findings = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seeds = seed_artifacts(folder)
        for s in seeds:  # the seeds themselves must load and caption
            (folder / "m.capz").write_bytes(s)
            load_captioner(folder / "m.capz").caption_images(image)
        base = _status("VmHWM")
        cap = limit_memory(mem_mb)
        start = time.perf_counter()
        while counts["tried"] < mutants and time.perf_counter() - start < seconds:
            data, what = mutant(rng.choice(seeds), rng)
            (folder / "m.capz").write_bytes(data)
            counts["tried"] += 1
            kind = what.split()[0]
            kinds[kind] = kinds.get(kind, 0) + 1
            try:
                model = load_captioner(folder / "m.capz")
                assert isinstance(model, Captioner)
                words = model.caption_images(image)
                assert len(words) == 1 and isinstance(words[0], str)
                counts["loaded"] += 1
            except UserError as e:
                counts["refused"] += 1
                if "\n" in str(e):
                    findings.append({"mutation": what, "error": "UserError of several lines", "message": str(e)})
            except BaseException as e:  # noqa: BLE001  a finding, whatever it is
                if isinstance(e, KeyboardInterrupt):
                    raise
                findings.append({"mutation": what, "error": type(e).__name__, "message": str(e)[:300],
                                 "where": traceback.format_exc().strip().splitlines()[-3].strip()})
    return {**counts, "findings": len(findings), "seconds": round(time.perf_counter() - start, 1),
            "mutations": kinds, "peak_rss_mb": round(_status("VmHWM") / 2**20, 1),
            "peak_rss_growth_mb": round((_status("VmHWM") - base) / 2**20, 1),
            "address_space_cap_mb": round(cap / 2**20), "examples": findings[:10]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=math.inf, help="stop after this long, even if fewer mutants")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-mb", type=int, default=512, help="address space allowed above the size after imports")
    a = ap.parse_args(argv)
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    report = campaign(a.mutants, a.seconds, a.seed, a.mem_mb)
    print(json.dumps(report))
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
