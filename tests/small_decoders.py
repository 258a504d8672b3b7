"""Every decoder family at contract size: tiny settings, a tiny model, tiny features.

Shared by the decoder contract (test_decoders.py), the family tests (test_<family>.py), the
architecture options (test_arch_changes.py) and the ONNX Runtime tests (``image_captioner``).
"""
from typing import NamedTuple

import pytest
import torch
from torch import nn

from captioning.models import create_decoder

V, C = 7, 8  # words, feature size
SEQ = torch.tensor([[1, 2, 0], [4, 5, 6], [7, 0, 0]])  # one caption per image of feats()
SEQ2 = torch.tensor([[3, 1, 0, 0], [2, 2, 5, 4], [7, 0, 0, 0], [1, 2, 3, 0]])  # two per image of feats(2)
PLAIN = {nn.Linear, nn.LSTMCell, nn.Embedding, nn.LayerNorm}  # the weight holders pruning and int8 see
# The architecture options every family takes (captioning/models/embedding.py); the contract runs on each.
# Rank 4 is below every tiny width; at 3 the tiny transformer's beams never end in the search check.
VARIANTS = {
    "plain": {},
    "rank": dict(embed_rank=4),
    "rank-plain-logit": dict(embed_rank=4, factorize_logit=False),
    "tied": dict(tie_embeddings=True),
    "tied-rank": dict(embed_rank=4, tie_embeddings=True),
}


class Small(NamedTuple):
    """A family at contract size."""

    config: dict   # tiny widths, every dropout off
    dropout: dict  # its dropout settings, switched on
    weights: set   # the module types that hold its weights, all in PLAIN
    head: str      # its output layer; bias[0] is the end token's
    wider: dict    # widths with which Adam at ``lr`` fits a tiny batch in 60 steps
    lr: float


SMALL = {
    "updown": Small(
        config=dict(input_encoding_size=12, rnn_size=10, att_hid_size=6, drop_prob=0.0),
        dropout=dict(drop_prob=0.5),
        weights={nn.Linear, nn.LSTMCell, nn.Embedding},
        head="logit",
        wider=dict(input_encoding_size=16, rnn_size=64, att_hid_size=16), lr=1e-2),
    "aoanet": Small(
        config=dict(input_encoding_size=12, rnn_size=16, att_hid_size=8, num_heads=4, refiner_layers=2,
                    drop_prob=0.0, att_dropout=0.0, aoa_dropout=0.0),
        dropout=dict(drop_prob=0.5, att_dropout=0.1, aoa_dropout=0.3),
        weights={nn.Linear, nn.LSTMCell, nn.Embedding, nn.LayerNorm},
        head="logit",
        wider=dict(input_encoding_size=16, rnn_size=32, att_hid_size=32), lr=5e-3),
    "transformer": Small(
        config=dict(d_model=16, d_ff=24, num_heads=4, enc_layers=2, dec_layers=2, dropout=0.0, drop_prob=0.0),
        dropout=dict(dropout=0.1, drop_prob=0.5),
        weights={nn.Linear, nn.Embedding, nn.LayerNorm},
        head="generator",
        wider=dict(d_model=32, d_ff=64), lr=3e-3),
}


def small(name: str) -> Small:
    if name not in SMALL:
        pytest.fail(f"decoder {name!r} is registered but has no entry in SMALL (tests/test_decoders.py); "
                    "add its tiny settings so that it gets the decoder contract")
    return SMALL[name]


def tiny(name: str, **kw):
    torch.manual_seed(0)
    return create_decoder(name, vocab_size=V, feat_dim=C, **{**small(name).config, **kw})


def feats(b=3, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, generator=g), torch.randn(b, n, C, generator=g)


def assert_stepping_equals_teacher_forcing(m):
    """``m`` (in eval mode), stepped a token at a time from ``init_state``, gives its teacher-forced log-probabilities."""
    fc, att = feats(2)
    with torch.no_grad():
        out = m(fc, att, SEQ2)
        assert out.shape == (4, 5, V + 1)
        ctx = tuple(t.repeat_interleave(2, 0) for t in m.prepare(fc, att))
        state = m.init_state(ctx)
        tokens = torch.zeros(4, dtype=torch.long)
        for t in range(5):
            lp, state = m.step(tokens, state, ctx)
            torch.testing.assert_close(out[:, t], lp, rtol=0, atol=1e-6)
            if t < 4:
                tokens = SEQ2[:, t]
    assert torch.allclose(out.exp().sum(-1), torch.ones(4, 5), atol=1e-5)


def image_captioner(family: str, zeros: float = 0.0, dropout: bool = False, prune_encoder: bool = False,
                    img_size: int = 64, words: int = 20, max_length: int = 12):
    """A whole random captioner whose captions depend on the image: timm's tiny ``test_efficientnet``
    (at 64 px: 2×2 regions, so attention has a choice) and a contract-size decoder with larger weights.
    ``zeros``: the smallest-magnitude fraction of the decoder's (and with ``prune_encoder``, the
    encoder's) matrices set to zero. ``dropout``: the decoder built with dropout, to check eval mode."""
    from captioning.captioner import Captioner
    from captioning.encoders import create_encoder
    from helpers import prune_smallest

    enc = create_encoder("test_efficientnet", img_size=img_size)
    dec = create_decoder(family, vocab_size=words, feat_dim=enc.feat_dim,
                         **{**SMALL[family].config, **(SMALL[family].dropout if dropout else {})})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in enc.parameters():  # random timm init gives features ~1e-3: grow them to ~1
            if p.ndim > 1:
                p.mul_(1.4)
        for p in dec.parameters():  # larger than the default init, so captions depend on the image
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))
    if zeros:
        prune_smallest(dec, zeros)
        if prune_encoder:
            prune_smallest(enc, zeros)
    return Captioner(enc, dec, {i: f"w{i}" for i in range(1, words + 1)}, max_length=max_length)
