"""The .capz artifact: exact round trip, and one clear error for a damaged file."""
import struct

import pytest
import torch

from captioning.compress import artifact
from captioning.errors import UserError


def _groups():
    g = torch.Generator().manual_seed(0)
    return {
        "encoder": {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "bn.num_batches_tracked": torch.tensor(7)},
        "decoder": {"embed.weight": torch.randn(50, 16, generator=g), "logit.bias": torch.zeros(50)},
    }


def test_round_trip_is_exact(tmp_path):
    groups = _groups()
    size = artifact.pack(tmp_path / "m.capz", groups, {"vocab": {"1": "a"}, "n": 3})
    assert size == (tmp_path / "m.capz").stat().st_size
    config, back = artifact.read(tmp_path / "m.capz")
    assert config == {"vocab": {"1": "a"}, "n": 3}
    for g, state in groups.items():
        assert back[g].keys() == state.keys()
        for k, t in state.items():
            assert back[g][k].dtype == t.dtype and torch.equal(back[g][k], t)


def test_same_input_gives_identical_bytes(tmp_path):
    artifact.pack(tmp_path / "a.capz", _groups(), {"x": 1})
    artifact.pack(tmp_path / "b.capz", _groups(), {"x": 1})
    assert (tmp_path / "a.capz").read_bytes() == (tmp_path / "b.capz").read_bytes()


def test_truncated_artifact_fails_clearly(tmp_path):
    p = tmp_path / "m.capz"
    artifact.pack(p, _groups(), {})
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        artifact.read(p)


def test_tampered_artifact_fails_clearly(tmp_path):
    p = tmp_path / "m.capz"
    artifact.pack(p, _groups(), {})
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        artifact.read(p)


def test_other_format_version_is_refused(tmp_path):
    p = tmp_path / "m.capz"
    artifact.pack(p, _groups(), {})
    data = bytearray(p.read_bytes())
    struct.pack_into("<H", data, 4, 99)
    p.write_bytes(bytes(data))
    with pytest.raises(UserError, match="format version 99"):
        artifact.read(p)


def test_not_an_artifact(tmp_path):
    p = tmp_path / "m.capz"
    p.write_bytes(b"\x80\x04pickle")
    with pytest.raises(UserError, match="not a captioning artifact"):
        artifact.read(p)
    with pytest.raises(UserError, match="not found"):
        artifact.read(tmp_path / "missing.capz")
