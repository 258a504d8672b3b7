"""AoANet: reference parameter counts, its options, and its use of refined regions. The contract every
decoder passes (stepping, search, save/load, training ...) is in test_decoders.py."""
import pytest
import torch
from small_decoders import SEQ, feats, tiny

from captioning.errors import UserError
from captioning.models import create_decoder

REF = 85_562_640


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_reference_parameter_count_and_breakdown():
    m = create_decoder("aoanet", vocab_size=9487, feat_dim=2048)
    assert n_params(m) == REF
    assert n_params(m.embed) == 9_715_712
    assert n_params(m.att_embed) == 2_098_176
    assert n_params(m.logit) == 9_725_200
    assert n_params(m.ctx2att) == 2_099_200
    assert n_params(m.refiner) == 44_085_248
    assert all(n_params(layer) == 7_347_200 for layer in m.refiner.layers) and len(m.refiner.layers) == 6
    assert n_params(m.core) == 17_839_104
    assert n_params(create_decoder("aoanet", 9487, 2049)) - REF == 1024
    assert n_params(create_decoder("aoanet", 9488, 2048)) - REF == 2049


def test_variants_change_the_architecture():
    assert n_params(tiny("aoanet", refiner_layers=0).refiner) == 0
    assert len(tiny("aoanet", refiner_layers=3).refiner.layers) == 3
    m = tiny("aoanet", att_hid_size=12)
    assert m.ctx2att.out_features == 24 and m.core.query.out_features == 12
    with pytest.raises(UserError, match="num_heads"):
        tiny("aoanet", att_hid_size=10)
    with pytest.raises(UserError, match="refine_aoa"):  # a reference-code option this model does not take
        tiny("aoanet", refine_aoa=1)


def test_uses_refined_regions_not_fc():
    m = tiny("aoanet").eval()
    fc, att = feats()
    with torch.no_grad():
        out = m(fc, att, SEQ)
        assert torch.equal(out, m(torch.randn_like(fc), att, SEQ))  # as in the reference: mean-pooled regions
        mean, values, keys = m.prepare(fc, att)
        refined = m.refiner(torch.relu(m.att_embed(att)))
        torch.testing.assert_close(mean, refined.mean(1))
        torch.testing.assert_close(torch.cat([values, keys], -1), m.ctx2att(refined))
        m.refiner.layers[0].aoa.weight.mul_(2)  # the refiner is on the path
        assert not torch.allclose(out, m(fc, att, SEQ))
