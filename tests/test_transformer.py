"""Transformer: reference parameter counts, tied generator, the K/V cache and the causal mask, its
settings. The contract every decoder passes (stepping, search, save/load, training ...) is in
test_decoders.py."""
import pytest
import torch
from small_decoders import SEQ2, C, V, feats, tiny

from captioning.errors import UserError
from captioning.models import create_decoder
from captioning.models.transformer import Transformer

REF = 54_914_832


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_reference_parameter_count_and_breakdown():
    m = create_decoder("transformer", vocab_size=9487, feat_dim=2048)
    assert n_params(m) == REF
    assert n_params(m.att_embed) == 1_049_088
    assert n_params(m.encoder) + n_params(m.enc_norm) == 18_915_328
    assert n_params(m.decoder) + n_params(m.dec_norm) == 25_225_216
    assert n_params(m.embed) == 4_857_856
    assert n_params(m.generator) == 4_867_344
    assert n_params(create_decoder("transformer", 9487, 2049)) - REF == 512
    assert n_params(create_decoder("transformer", 9488, 2048)) - REF == 1025


def test_tied_embeddings_drop_the_generator_matrix():
    m = create_decoder("transformer", vocab_size=9487, feat_dim=2048, tie_embeddings=True)
    assert n_params(m) == REF - 4_857_856
    assert set(dict(m.generator.named_parameters())) == {"bias"} and m.generator.bias.shape == (9488,)
    # the output really uses the embedding matrix: changing it changes the log-probs of a step
    t = tiny("transformer", tie_embeddings=True).eval()
    fc, att = feats()
    with torch.no_grad():
        ctx = t.prepare(fc, att)
        before, _ = t.step(torch.zeros(3, dtype=torch.long), t.init_state(ctx), ctx)
        t.embed.weight[5] += torch.randn(16)  # token 5 is never fed here, so only the output side sees it
        after, _ = t.step(torch.zeros(3, dtype=torch.long), t.init_state(ctx), ctx)
    assert not torch.allclose(before[:, 5], after[:, 5])


@pytest.mark.parametrize("tie", [False, True])
def test_cache_grows_one_position_per_step(tie):
    """The state holds each decoder layer's self-attention K and V of the positions seen so far, and the
    causal parallel pass is the base class's step loop done at once."""
    m = tiny("transformer", tie_embeddings=tie).eval()
    fc, att = feats(2)
    with torch.no_grad():
        ctx = m.prepare(fc, att)
        state = m.init_state(ctx)
        assert all(s.shape == (2, 0, 16) for s in state) and len(state) == 4
        for t in range(1, 6):
            _, state = m.step(torch.zeros(2, dtype=torch.long), state, ctx)
            assert all(s.shape == (2, t, 16) for s in state)
        torch.testing.assert_close(m(fc, att, SEQ2), super(Transformer, m).forward(fc, att, SEQ2), rtol=0, atol=1e-5)


def test_earlier_positions_do_not_see_later_words():
    m = tiny("transformer").eval()
    fc, att = feats(1)
    a, b = torch.tensor([[3, 1, 4, 1]]), torch.tensor([[3, 1, 6, 6]])
    with torch.no_grad():
        oa, ob = m(fc, att, a), m(fc, att, b)
    torch.testing.assert_close(oa[:, :3], ob[:, :3], rtol=0, atol=1e-6)  # inputs 0,3,1 are shared
    assert not torch.allclose(oa[:, 3:], ob[:, 3:])


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="num_heads"):
        create_decoder("transformer", V, C, d_model=18, num_heads=4)
    with pytest.raises(UserError, match="dec_layers"):
        create_decoder("transformer", V, C, d_model=16, num_heads=4, dec_layers=0)
    with pytest.raises(UserError, match="n_layers"):  # a reference-code option this model does not take
        create_decoder("transformer", V, C, n_layers=2)
