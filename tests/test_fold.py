"""Batch norm folded for storage: the same function, and three constant tensors per batch norm."""
import copy

import pytest
import torch
from torch import nn

from captioning.captioner import load_captioner, pack_model
from captioning.compress import artifact
from captioning.compress.encodings import quantize_rows
from captioning.compress.fold import conv_bn_pairs, folded_state, is_folded
from captioning.encoders import create_encoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py

_BN = nn.modules.batchnorm._BatchNorm


def _trained_like(seed=0):
    """A tiny timm CNN whose batch norms hold statistics far from their init, as after training."""
    enc = create_encoder("test_efficientnet", img_size=32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, _BN):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=g))  # negative scales too
                m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
    return enc


def _sample(seed):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _outputs(module, state, x):
    m = copy.deepcopy(module)
    m.load_state_dict(state)
    with torch.no_grad():
        return m.eval()(x)


def test_every_batch_norm_is_folded_and_the_outputs_stay():
    enc = _trained_like()
    bns = [n for n, m in enc.named_modules() if isinstance(m, _BN)]
    assert len(conv_bn_pairs(enc, _sample(0))) == len(bns) > 5
    state = folded_state(enc, _sample(0))
    for name in bns:
        eps = dict(enc.named_modules())[name].eps
        assert torch.equal(state[f"{name}.weight"], torch.ones_like(state[f"{name}.weight"]))
        assert torch.equal(state[f"{name}.running_mean"], torch.zeros_like(state[f"{name}.running_mean"]))
        assert torch.equal(state[f"{name}.running_var"], torch.full_like(state[f"{name}.running_var"], 1.0) - eps)
    x = _sample(1)  # not the input the fold was checked on
    for want, got in zip(_outputs(enc, enc.state_dict(), x), _outputs(enc, state, x)):
        assert not torch.equal(want, got)  # the weights really changed ...
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))  # ... not the function


def test_folding_twice_changes_nothing():
    enc = _trained_like()
    once = folded_state(enc, _sample(0))
    twice = folded_state(enc, _sample(0), once)
    assert all(torch.equal(once[k], twice[k]) for k in once)
    bn = next(m for m in copy.deepcopy(enc).eval().modules() if isinstance(m, _BN))
    assert not is_folded(bn)


def test_int8_rows_keep_their_integers_when_folded():
    """Per-row int8 scales each row by its own maximum, so a per-channel factor only moves the scale."""
    g = torch.Generator().manual_seed(0)
    w, s = torch.randn(64, 16, 3, 3, generator=g), torch.randn(64, generator=g) * 2
    q, scale = quantize_rows(w)
    qf, scale_f = quantize_rows(w * s[:, None, None, None])
    same = (qf == q * torch.sign(s).to(torch.int8)[:, None]).float().mean()
    assert same > 0.999  # a value at exactly .5 of a step may round the other way after the float product
    torch.testing.assert_close(scale_f, scale * s.abs())


class _Shortcut(nn.Module):
    """A convolution whose output feeds its batch norm and, unfoldably, the sum after it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c) + c


def test_a_convolution_with_a_second_reader_is_not_folded():
    m = _Shortcut().eval()
    with torch.no_grad():
        m.bn.running_var.fill_(4.0), m.bn.weight.fill_(3.0)
    assert conv_bn_pairs(m, _sample(0)) == [("conv", "bn")]  # data flow alone pairs them ...
    with pytest.warns(UserWarning, match="batch norm not folded"):
        state = folded_state(m, _sample(0))  # ... the output check refuses the fold
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_the_artifact_stores_each_folded_constant_once(tmp_path):
    from captioning.models import create_decoder

    enc = _trained_like()
    dec = create_decoder("updown", vocab_size=10, feat_dim=enc.feat_dim, input_encoding_size=8, rnn_size=8,
                         att_hid_size=4)
    itow = {i: f"w{i}" for i in range(1, 11)}
    pack_model(tmp_path / "m.capz", enc, dec, itow, max_length=5, quantization="fp32")
    body = (tmp_path / "m.capz").read_bytes()[artifact._PREFIX.size:]
    header, _ = artifact._header(artifact._inflate(body, "m"), "m")
    encodings = {e["name"]: e["encoding"] for e in header["tensors"] if e["group"] == "encoder"}
    bns = [n for n, m in enc.named_modules() if isinstance(m, _BN)]
    for name in bns:
        assert [encodings[f"{name}.{k}"] for k in ("weight", "running_mean", "running_var")] == ["const"] * 3
        assert encodings[f"{name}.bias"] == "raw"
    loaded = load_captioner(tmp_path / "m.capz")
    x = _sample(2)
    for want, got in zip(_outputs(enc, enc.state_dict(), x), loaded.encoder(x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
