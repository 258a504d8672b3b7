"""Quantization modes and compact encodings: exact round trips, error bounds, policy, sizes."""
import pytest
import torch
from torch import nn

from captioning.compress import artifact
from captioning.compress.encodings import quantize_rows
from captioning.compress.quantize import QUANT_MODES, encoding_for, roundtrip, storage_floor_bytes
from captioning.errors import UserError

DENSE_OF = {"sparse_raw": "raw", "sparse_fp16": "fp16", "sparse_int8": "int8_row"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _tensor(shape, zeros=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    if zeros:
        t[torch.rand(shape, generator=g) < zeros] = 0
    return t


def _decode(encoding, t, via_file=None):
    """decode(encode(t)); through a real artifact file when ``via_file`` is given."""
    if via_file is not None:
        artifact.pack(via_file, {"g": {"t": t}}, {}, lambda g, n, x: encoding)
        return artifact.read(via_file)[1]["g"]["t"]
    params, chunks = artifact.ENCODINGS[encoding][0](t)
    return artifact.ENCODINGS[encoding][1](params, chunks, tuple(t.shape), "float32")


def _prune(state, zeros):
    """Zero the smallest-magnitude fraction ``zeros`` of every weight (dim >= 2)."""
    out = {}
    for k, t in state.items():
        if t.is_floating_point() and t.ndim >= 2 and zeros > 0:
            cut = t.abs().flatten().kthvalue(max(1, int(zeros * t.numel()))).values
            t = torch.where(t.abs() <= cut, torch.zeros_like(t), t)
        out[k] = t.clone()
    return out


@pytest.fixture(scope="module")
def model_groups():
    from captioning.encoders import create_encoder
    from captioning.models import create_decoder

    enc = create_encoder("mobilenetv3_small_050", img_size=64)
    dec = create_decoder("updown", vocab_size=30, feat_dim=enc.feat_dim, input_encoding_size=32,
                         rnn_size=32, att_hid_size=16)
    return {"encoder": enc.state_dict(), "decoder": dec.state_dict()}


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize("encoding", ["raw", "fp16", "int8_row", "sparse_raw", "sparse_fp16", "sparse_int8"])
def test_every_encoding_survives_a_file_and_keeps_shape(tmp_path, encoding):
    t = _tensor((6, 3, 2, 2), zeros=0.5)
    back = _decode(encoding, t, tmp_path / "t.capz")
    assert back.dtype == torch.float32 and back.shape == t.shape
    assert torch.equal(back, _decode(encoding, t))  # the file adds nothing, loses nothing


def test_raw_and_sparse_raw_are_exact():
    t = _tensor((7, 5), zeros=0.6)
    assert torch.equal(_decode("raw", t), t)
    assert torch.equal(_decode("sparse_raw", t), t)


def test_fp16_is_within_half_precision_rounding():
    t = _tensor((40, 9)) * 3
    back = _decode("fp16", t)
    assert torch.equal(back, t.half().float())
    assert ((back - t).abs() <= t.abs() * 2.0 ** -11 + 1e-7).all()
    assert not torch.equal(back, t)  # it did lose precision: it really is stored as fp16


@pytest.mark.parametrize("shape", [(12, 20), (8, 3, 3, 3), (50,)])
def test_int8_row_error_is_at_most_half_a_step(shape):
    t = _tensor(shape) * torch.linspace(0.01, 5, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    q, scale = quantize_rows(t)
    assert q.dtype == torch.int8 and scale.shape == ((shape[0],) if len(shape) > 1 else (1,))
    back = _decode("int8_row", t)
    err = (back - t).reshape(len(scale), -1).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (q.abs().amax(1) == 127).all()  # each row uses its full range: scales are per row


def test_int8_all_zero_row_decodes_to_zeros_without_nan():
    t = _tensor((4, 6))
    t[2] = 0
    for enc in ("int8_row", "sparse_int8"):
        back = _decode(enc, t)
        assert torch.isfinite(back).all() and (back[2] == 0).all()
    assert torch.equal(_decode("sparse_int8", torch.zeros(3, 5)), torch.zeros(3, 5))


@pytest.mark.parametrize("sparse", ["sparse_raw", "sparse_fp16", "sparse_int8"])
def test_sparse_keeps_zeros_and_matches_its_dense_form(sparse):
    t = _tensor((16, 4, 3), zeros=0.7)
    back = _decode(sparse, t)
    assert (back[t == 0] == 0).all()
    assert torch.equal(back, _decode(DENSE_OF[sparse], t))


def test_sparse_stores_only_the_nonzeros():
    t = _tensor((64, 64), zeros=0.9)
    _, chunks = artifact.ENCODINGS["sparse_int8"][0](t)
    assert chunks["values"].size == int((t != 0).sum())
    assert chunks["mask"].nbytes == 64 * 64 // 8 and chunks["scales"].size == 64


# ---------------------------------------------------------------- policy


def test_policy_per_mode_and_kind_of_tensor():
    w, b = _tensor((20, 30)), _tensor((20,))
    assert [encoding_for(m, "decoder", "w", w) for m in QUANT_MODES] == ["raw", "fp16", "int8_row"]
    assert encoding_for("int8", "decoder", "bias", b) == "raw"  # 1-D stays fp32 in int8
    assert encoding_for("fp16", "decoder", "bias", b) == "fp16"
    assert encoding_for("int8", "encoder", "bn.num_batches_tracked", torch.tensor(5)) == "raw"
    assert encoding_for("int8", "encoder", "conv.weight", _tensor((8, 4, 3, 3))) == "int8_row"
    # depthwise kernels stay fp16 in int8 (int8 there cost CIDEr); a 1x1 single-input conv does not
    assert encoding_for("int8", "encoder", "conv_dw.weight", _tensor((8, 1, 3, 3))) == "fp16"
    assert encoding_for("int8", "encoder", "conv_dw.weight", _tensor((64, 1, 3, 3), zeros=0.9)) == "sparse_fp16"
    assert encoding_for("int8", "encoder", "conv_dw.weight", 1e5 * _tensor((8, 1, 3, 3))) == "raw"  # fp16 overflow
    assert encoding_for("int8", "encoder", "conv_pw.weight", _tensor((8, 1, 1, 1))) == "int8_row"
    assert encoding_for("fp16", "encoder", "bn.running_var", torch.tensor([1e6, 2e6, 3.0, 4.0])) == "raw"  # fp16 overflow
    # one repeated value (a folded batch norm's constants, an emptied weight) is stored once, in any mode
    assert [encoding_for(m, "encoder", "bn.weight", torch.ones(4)) for m in QUANT_MODES] == ["const"] * 3
    assert encoding_for("int8", "decoder", "w", torch.zeros(20, 30)) == "const"


def test_sparse_is_chosen_only_when_smaller():
    # fp32: sparse costs 1/8 byte per element for the mask and saves 4 bytes per zero
    assert encoding_for("fp32", "d", "w", _tensor((100, 100), zeros=0.01)) == "raw"
    assert encoding_for("fp32", "d", "w", _tensor((100, 100), zeros=0.06)) == "sparse_raw"
    assert encoding_for("fp16", "d", "w", _tensor((100, 100), zeros=0.5)) == "sparse_fp16"
    # int8: the mask (1 bit) pays off only above 1/8 zeros
    assert encoding_for("int8", "d", "w", _tensor((100, 100), zeros=0.08)) == "int8_row"
    assert encoding_for("int8", "d", "w", _tensor((100, 100), zeros=0.2)) == "sparse_int8"


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="int4"):
        encoding_for("int4", "d", "w", _tensor((2, 2)))


def test_roundtrip_equals_what_the_artifact_gives_back(tmp_path, model_groups):
    groups = {g: _prune(s, 0.6) for g, s in model_groups.items()}
    for mode in QUANT_MODES:
        artifact.pack(tmp_path / "m.capz", groups, {}, lambda g, n, t: encoding_for(mode, g, n, t))
        _, back = artifact.read(tmp_path / "m.capz")
        rt = roundtrip(groups, mode)
        for g in groups:
            assert rt[g].keys() == back[g].keys() == groups[g].keys()
            assert all(torch.equal(rt[g][k], back[g][k]) for k in rt[g]), mode


# ---------------------------------------------------------------- sizes


def _size(tmp_path, groups, mode):
    return artifact.pack(tmp_path / f"{mode}.capz", groups, {}, lambda g, n, t: encoding_for(mode, g, n, t))


def test_artifact_shrinks_with_quantization_and_sparsity(tmp_path, model_groups):
    sizes = {(z, m): _size(tmp_path, {g: _prune(s, z) for g, s in model_groups.items()}, m)
             for z in (0.0, 0.5, 0.8, 0.95) for m in QUANT_MODES}
    for z in (0.0, 0.5, 0.8, 0.95):
        assert sizes[z, "fp32"] > sizes[z, "fp16"] > sizes[z, "int8"]
    for m in QUANT_MODES:
        assert sizes[0.0, m] > sizes[0.5, m] > sizes[0.8, m] > sizes[0.95, m]
    assert sizes[0.0, "fp32"] / sizes[0.0, "int8"] > 3.4  # ~4x: 8 of 32 bits, plus scales
    assert sizes[0.0, "fp32"] / sizes[0.0, "fp16"] > 1.9
    assert sizes[0.95, "int8"] < 0.3 * sizes[0.0, "int8"]


def test_storage_floor_formula():
    t = _tensor((10, 8), zeros=0.5)
    nnz = int((t != 0).sum())
    groups = {"d": {"w": t, "b": torch.arange(1.0, 11.0), "one": torch.ones(10), "n": torch.tensor(3)}}
    # int8: w sparse (nnz x 8 + 80 mask bits + 10 scales x 32); b raw fp32; one: const (one fp32 value);
    # n raw int64
    assert storage_floor_bytes(groups, "int8") == -(-(nnz * 8 + 80 + 320 + 10 * 32 + 32 + 64) // 8)
    assert storage_floor_bytes({"d": {"w": t}}, "fp32") == -(-(nnz * 32 + 80) // 8)


def test_storage_floor_tracks_the_artifact(tmp_path, model_groups):
    for z in (0.0, 0.8):
        groups = {g: _prune(s, z) for g, s in model_groups.items()}
        for mode in QUANT_MODES:
            floor = storage_floor_bytes(groups, mode)
            # zstd only finds some redundancy in weight values: the file stays near the floor
            assert 0.75 * floor < _size(tmp_path, groups, mode) < 1.1 * floor, (z, mode)


def test_artifact_is_above_the_floor_for_incompressible_values(tmp_path):
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2 ** 16, (256, 512), generator=g, dtype=torch.int32)
    t = (bits.to(torch.int16).view(torch.float16)).float().nan_to_num(0.0, 1.0, -1.0)
    groups = {"d": {"w": t}}
    assert 0 < storage_floor_bytes(groups, "fp16") < _size(tmp_path, groups, "fp16")


# ---------------------------------------------------------------- runtime


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.lin, self.cell = nn.Embedding(10, 6), nn.Linear(6, 5), nn.LSTMCell(5, 4)


def test_int8_model_computes_in_float_on_the_stored_grid():
    """torch runs int8 weight-only: plain float modules whose weights are the stored integers x their row's scale."""
    torch.manual_seed(0)
    m = _Tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    after = roundtrip({"m": m.state_dict()}, "int8")["m"]
    m.load_state_dict(after)
    assert type(m.lin) is nn.Linear and type(m.cell) is nn.LSTMCell and m.lin.weight.dtype == torch.float32
    for name in ("embed.weight", "lin.weight", "cell.weight_ih", "cell.weight_hh"):
        w, scale = after[name], before[name].abs().amax(1, keepdim=True) / 127
        assert not torch.equal(w, before[name])  # really rounded ...
        torch.testing.assert_close(w / scale, (w / scale).round(), rtol=0, atol=1e-4)  # ... to the int8 grid
        assert (w / scale).abs().max() <= 127 + 1e-4
    assert torch.equal(after["lin.bias"], before["lin.bias"])  # 1-D tensors stay fp32

