"""An artifact from a stranger: every malformed file fails with one line, and no bomb allocates.

Each case starts from a valid tiny artifact, breaks one thing, seals it again with a fresh checksum
(so the break reaches the decoder) and checks the one-line ``UserError`` that names the file and
the fault. ``test_fuzz_artifact.py`` then tries thousands of random breaks.
"""
import copy
import hashlib
import struct

import numpy as np
import pytest

from captioning.captioner import load_captioner
from captioning.cli import main
from captioning.compress import artifact
from captioning.errors import UserError
from helpers import ROOT, load_script

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


fuzz = load_script("fuzz_artifact")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """{"fp32": header, payload} ... of the fuzzer's three valid seed artifacts (fp32 pruned, fp16, int8)."""
    folder = tmp_path_factory.mktemp("seeds")
    out = {}
    for name, data in zip(("fp32", "fp16", "int8"), fuzz.seed_artifacts(folder)):
        out[name] = fuzz.split_raw(fuzz.unseal(data))
    return out


def _write(tmp_path, header, payload: bytes = b"", name="bad.capz"):
    path = tmp_path / name
    path.write_bytes(artifact.seal(fuzz.join_raw(header, payload)))
    return path


def _with_body(tmp_path, body: bytes):
    """A file whose (compressed) body is ``body`` as given, with a valid prefix and checksum."""
    path = tmp_path / "bad.capz"
    prefix = artifact._PREFIX.pack(artifact.MAGIC, artifact.FORMAT_VERSION, len(body), hashlib.sha256(body).digest())
    path.write_bytes(prefix + body)
    return path


def _refused(path, match: str):
    """load_captioner(path) fails with one UserError line that names the file and matches ``match``."""
    with pytest.raises(UserError, match=match) as e:
        load_captioner(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path)), str(e.value)


def _entry(header, encoding: str) -> dict:
    return next(e for e in header["tensors"] if e["encoding"] == encoding)


def test_the_seeds_load_and_use_every_encoding(seeds, tmp_path):
    used = {e["encoding"] for header, _ in seeds.values() for e in header["tensors"]}
    assert {"raw", "const", "fp16", "int8_row", "sparse_raw", "sparse_int8"} <= used
    for header, payload in seeds.values():
        load_captioner(_write(tmp_path, header, payload))


# ---------------------------------------------------------------- bombs


def _zeros_frame(size: int, declare: bool) -> bytes:
    """A zstd frame of ``size`` zero bytes (3 GiB compress to ~96 KB)."""
    import zstandard

    kwargs = {"size": size} if declare else {}
    c = zstandard.ZstdCompressor(level=1, write_content_size=declare).compressobj(**kwargs)
    block = bytes(64 << 20)
    return b"".join([c.compress(block) for _ in range(size // len(block))] + [c.flush()])


@pytest.fixture(scope="module")
def bomb():
    return _zeros_frame(3 << 30, declare=True)


def test_zstd_bomb_is_refused_before_it_inflates(bomb, tmp_path):
    path = _with_body(tmp_path, bomb)
    assert path.stat().st_size < 120_000
    _refused(path, r"inflates to 3221225472 bytes, over the 2147483648-byte limit")


def test_zstd_frame_that_lies_about_its_size_stops_at_the_size_it_declares(bomb, tmp_path):
    assert bomb[4] == 0x80  # frame header: 4-byte content size at offset 6, after a window byte
    liar = bomb[:6] + struct.pack("<I", 1 << 20) + bomb[10:]
    _refused(_with_body(tmp_path, liar), r"inflates past the 1048576 bytes it declares|does not decompress")


def test_zstd_frame_without_a_declared_size_is_refused(tmp_path):
    _refused(_with_body(tmp_path, _zeros_frame(64 << 20, declare=False)), r"does not declare its decompressed size")


def test_body_that_is_not_zstd(tmp_path):
    _refused(_with_body(tmp_path, b"definitely not a zstd frame"), r"not a zstd frame")


def test_sparse_entry_whose_declared_shape_is_huge(seeds, tmp_path):
    """A few hundred bytes that used to ask sparse decoding for GiBs: the mask must really be there."""
    header, payload = copy.deepcopy(seeds["fp32"])
    e, own = _entry(header, "sparse_raw"), b""
    for c in e["chunks"].values():  # a file holding this one tensor
        own, c["offset"] = own + payload[c["offset"]:c["offset"] + c["nbytes"]], len(own)
    e["shape"] = [30_000, 30_000]  # 900 M elements: over the loading limit
    path = _write(tmp_path, {"format_version": 1, "config": {}, "tensors": [e]}, own)
    assert path.stat().st_size < 1_000
    _refused(path, r"the tensors hold over 536870912 elements")
    e["shape"] = [4096, 4096]  # under the limit, but its 2 MiB mask is not in the file
    path = _write(tmp_path, {"format_version": 1, "config": {}, "tensors": [e]}, own)
    _refused(path, r"chunk 'mask' should be \|u1 \[2097152\]")


def test_body_length_past_the_file_is_caught_before_reading(tmp_path, seeds):
    path = _write(tmp_path, *seeds["fp32"])
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 6, (1 << 31) - 1)
    path.write_bytes(bytes(data))
    _refused(path, r"artifact is truncated")
    struct.pack_into("<Q", data, 6, 1 << 40)
    path.write_bytes(bytes(data))
    _refused(path, r"over the 2147483648-byte limit")


# ---------------------------------------------------------------- a malformed body or header


@pytest.mark.parametrize("raw,match", [
    (b"\x01\x00", r"too short for a header"),
    (struct.pack("<I", 99) + b"{}", r"header length 99 runs past the body"),
    (struct.pack("<I", 5) + b"{abc}", r"header is not valid JSON"),
    (struct.pack("<I", 4) + b"\xff\xfe\x00\x01", r"header is not valid JSON"),
    (struct.pack("<I", 20_000) + b"[" * 10_000 + b"]" * 10_000, r"header is not valid JSON|needs a 'config'"),
    (struct.pack("<I", 2) + b"[]", r"needs a 'config' object and a 'tensors' list"),
], ids=["short-body", "header-length", "bad-json", "bad-utf8", "deep-json", "not-an-object"])
def test_malformed_body(tmp_path, raw, match):
    path = tmp_path / "bad.capz"
    path.write_bytes(artifact.seal(raw))
    _refused(path, match)


def test_header_without_tensors_or_config(seeds, tmp_path):
    header, payload = seeds["fp32"]
    _refused(_write(tmp_path, {k: v for k, v in header.items() if k != "tensors"}, payload), r"'tensors' list")
    _refused(_write(tmp_path, {**header, "config": []}, payload), r"'config' object")
    _refused(_write(tmp_path, {**header, "format_version": "1"}, payload), r"format version '1'")


def _break(seeds, tmp_path, seed: str, encoding: str, change) -> object:
    """The seed with ``change(entry)`` applied to its first tensor stored as ``encoding``."""
    header, payload = copy.deepcopy(seeds[seed])
    change(_entry(header, encoding))
    return _write(tmp_path, header, payload)


def _set(**kv):
    return lambda e: e.update(kv)


def _chunk(name, **kv):
    return lambda e: e["chunks"][name].update(kv)


@pytest.mark.parametrize("seed,encoding,change,match", [
    ("fp32", "raw", _set(dtype="complex64"), r"dtype 'complex64' cannot be stored as raw"),
    ("fp32", "raw", _set(dtype=7), r"dtype 7 cannot be stored as raw"),
    ("fp32", "raw", _set(dtype="int64"), r"chunk 'data' should be <i8"),  # the entry's dtype is not ignored
    ("fp32", "sparse_raw", _set(dtype="float16"), r"dtype 'float16' cannot be stored as sparse_raw"),
    ("fp32", "raw", _set(encoding="sparse_int4"), r"unknown encoding 'sparse_int4'"),
    ("fp32", "raw", _set(encoding={"a": 1}), r"unknown encoding \{'a': 1\}"),
    ("fp32", "raw", _set(shape=[-1, 2]), r"shape must be a list of at most 8 integers >= 0, got \[-1, 2\]"),
    ("fp32", "raw", _set(shape=[True]), r"shape must be a list"),
    ("fp32", "raw", _set(shape="16"), r"shape must be a list"),
    ("fp32", "raw", _set(params=None), r"needs 'params' and 'chunks' objects"),
    ("fp32", "raw", _set(group=None), r"needs a string 'group' and 'name'"),
    ("fp32", "raw", _chunk("data", offset=-1), r"chunk 'data' \(offset -1, .*lies outside"),
    ("fp32", "raw", _chunk("data", offset=10**9), r"chunk 'data' \(offset 1000000000, .*lies outside"),
    ("fp32", "raw", _chunk("data", offset="0"), r"lies outside"),
    ("fp32", "raw", _chunk("data", nbytes=4), r"chunk 'data' has 4 bytes; <f4 .* needs"),
    ("fp32", "raw", _chunk("data", dtype="<f8"), r"chunk 'data' should be <f4"),
    ("fp32", "raw", lambda e: e["chunks"].pop("data"), r"raw needs chunks \['data'\], found \[\]"),
    ("fp32", "raw", lambda e: e["chunks"].update(extra=dict(e["chunks"]["data"])), r"raw needs chunks \['data'\]"),
    # one value broadcast over 8 mask bits: the values must number the mask's set bits
    ("fp32", "sparse_raw", _chunk("values", shape=[1], nbytes=4), r"chunk 'values' should be <f4 \[\d+\]"),
    # one scale broadcast over every row: one scale per row
    ("int8", "int8_row", _chunk("scales", shape=[1], nbytes=4), r"chunk 'scales' should be <f4 \[\d+\]"),
    ("int8", "sparse_int8", _chunk("scales", shape=[1], nbytes=4), r"chunk 'scales' should be <f4 \[\d+\]"),
    ("int8", "int8_row", _chunk("values", shape=[1, 1], nbytes=1), r"chunk 'values' should be \|i1 \[\d+, \d+\]"),
    ("fp16", "fp16", _chunk("data", dtype="<f4"), r"chunk 'data' should be <f2"),
    # a constant is one value, whatever the shape it fills
    ("fp32", "const", _chunk("value", shape=[2], nbytes=8), r"chunk 'value' should be <f4 \[1\]"),
    ("fp32", "const", _set(dtype="complex64"), r"dtype 'complex64' cannot be stored as const"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 12 else None)
def test_malformed_tensor_entry(seeds, tmp_path, seed, encoding, change, match):
    _refused(_break(seeds, tmp_path, seed, encoding, change), match)


def test_entry_listed_twice(seeds, tmp_path):
    header, payload = copy.deepcopy(seeds["fp32"])
    header["tensors"].append(header["tensors"][0])
    _refused(_write(tmp_path, header, payload), r"is listed twice")


def test_mask_bits_past_the_tensor(seeds, tmp_path):
    """packbits pads the last mask byte with zeros; a set padding bit would desynchronise the values."""
    header, payload = copy.deepcopy(seeds["fp32"])
    e = next(e for e in header["tensors"] if e["encoding"] == "sparse_raw" and np.prod(e["shape"]) % 8)
    m = e["chunks"]["mask"]
    payload = bytearray(payload)
    payload[m["offset"] + m["nbytes"] - 1] |= 1
    _refused(_write(tmp_path, header, bytes(payload)), r"mask has bits set past its \d+ elements")


def test_non_finite_weights(seeds, tmp_path):
    header, payload = copy.deepcopy(seeds["fp32"])
    c = _entry(header, "raw")["chunks"]["data"]
    payload = bytearray(payload)
    payload[c["offset"]:c["offset"] + 4] = struct.pack("<f", float("nan"))
    _refused(_write(tmp_path, header, bytes(payload)), r"holds NaN or infinite values")
    header, payload = copy.deepcopy(seeds["fp32"])
    c = _entry(header, "const")["chunks"]["value"]
    payload = bytearray(payload)
    payload[c["offset"]:c["offset"] + 4] = struct.pack("<f", float("inf"))
    _refused(_write(tmp_path, header, bytes(payload)), r"holds NaN or infinite values")


# ---------------------------------------------------------------- configs that ask for an absurd model


def _config(seeds, tmp_path, **changes):
    header, payload = copy.deepcopy(seeds["fp32"])
    for key, value in changes.items():
        group, _, field = key.partition("__")
        if field:
            header["config"][group][field] = value
        else:
            header["config"][group] = value
    return _write(tmp_path, header, payload)


@pytest.mark.parametrize("changes,match", [
    (dict(decoder__vocab_size=10**9), r"updown: vocab_size must be an integer in \[1, 1000000\], got 1000000000"),
    (dict(decoder__rnn_size=2**40), r"updown: rnn_size must be an integer in \[1, 65536\]"),
    (dict(decoder__rnn_size="16"), r"updown: rnn_size must be an integer"),
    (dict(decoder__drop_prob=7.0), r"updown: drop_prob must be a probability in \[0, 1\]"),
    (dict(decoder__tie_embeddings=1), r"updown: tie_embeddings must be true or false"),
    (dict(decoder__name="aoanet", decoder__num_heads=0), r"aoanet: num_heads must be an integer in \[1, 1024\], got 0"),
    (dict(decoder__name="aoanet", decoder__num_heads=3), r"must be divisible by num_heads 3"),
    (dict(decoder__name=["updown"]), r"unknown decoder \['updown'\]"),
    (dict(decoder__rnn_size=32), r"decoder weights do not match its config"),  # bigger than the file holds
    (dict(decoder__feat_dim=64), r"decoder feat_dim 64 does not match the encoder's 256 features"),
    (dict(encoder__timm_name="no_such_net"), r"unknown encoder 'no_such_net' \(not a timm model\)"),
    (dict(encoder__timm_name="vit_giant_patch14_224"), r"the encoder's 1408 features"),  # 1 G weights, built on meta
    (dict(encoder__img_size=10**6), r"img_size must be an integer in \[8, 2048\]"),
    (dict(encoder__mean=1), r"model config is incomplete"),
    (dict(encoder=None), r"needs 'encoder' and 'decoder' objects"),
    (dict(vocab={"1": "a"}), r"vocab must map each index 1\.\.20"),
    (dict(vocab={str(i): i for i in range(1, 21)}), r"vocab must map each index"),
    (dict(vocab={"x": "a"}), r"vocab keys must be word indices"),
    (dict(max_len=10**9), r"'max_len' must be an integer >= 1 and <= 1000"),
    (dict(runtime={"quantization": []}), r"unknown quantization \[\]"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_absurd_config(seeds, tmp_path, changes, match):
    _refused(_config(seeds, tmp_path, **changes), match)


def test_cli_prints_one_line_and_exits_2(seeds, tmp_path, capsys):
    path = _config(seeds, tmp_path, decoder__vocab_size=10**9)
    img = next((ROOT / "tests" / "data" / "coco5" / "train2014").glob("*.jpg"))
    assert main(["caption", "--model", str(path), str(img)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vocab_size" in err and str(path) in err, err



def test_weights_whose_activations_overflow_cannot_caption(seeds, tmp_path):
    """Finite but absurd weights load; features that overflow float32 then stop captioning with one line."""
    import torch

    header, payload = copy.deepcopy(seeds["int8"])
    c = next(e for e in header["tensors"] if e["name"] == "model.conv_stem.weight")["chunks"]["scales"]
    payload = bytearray(payload)
    payload[c["offset"]:c["offset"] + c["nbytes"]] = np.full(c["nbytes"] // 4, 2e36, "<f4").tobytes()
    path = _write(tmp_path, header, bytes(payload))
    cap = load_captioner(path)
    with pytest.raises(UserError, match=r"activations overflow float32, so it cannot caption") as e:
        cap.caption_images(torch.rand(1, 3, fuzz.IMG, fuzz.IMG))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))
