"""Decoder architecture options (factorised / tied embeddings, small widths and depths): what is particular to them.

Counts are checked at the reference sizes on the meta device (no memory, no init cost); every
behaviour test uses tiny models. The decoder contract (config, stepping, search, save/load, int8,
training) runs on every option in ``VARIANTS`` in test_decoders.py.
"""
import pytest
import torch
from small_decoders import V, VARIANTS, assert_stepping_equals_teacher_forcing, feats, small, tiny

from captioning.compress.prune import make_masks, prunable
from captioning.errors import UserError
from captioning.models import create_decoder
from captioning.models.embedding import FactorizedEmbedding, TiedOutput, embedding_table

DECODERS = ("updown", "aoanet", "transformer")
# reference parameter count and the width W = E = H of the vocabulary matrices at the COCO settings
REFERENCE = {"updown": (52_125_025, 1000), "aoanet": (85_562_640, 1024), "transformer": (54_914_832, 512)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def reference(name, **kw):
    with torch.device("meta"):
        return create_decoder(name, vocab_size=9487, feat_dim=2048, **kw)


def n_params(module):
    return sum(p.numel() for p in module.parameters())  # a shared Parameter counts once


def head(m):
    return getattr(m, small(m.name).head)


# ---- parameter counts ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", DECODERS)
def test_reference_counts_with_each_option(name):
    ref, W = REFERENCE[name]
    V1, k = 9488, 64
    assert n_params(reference(name)) == ref
    # ALBERT: (V+1)W -> (V+1)k + kW for the embedding, and W(V+1) -> Wk + k(V+1) for the output (bias kept)
    assert n_params(reference(name, embed_rank=k)) == ref - 2 * V1 * W + 2 * (V1 * k + k * W)
    assert n_params(reference(name, embed_rank=k, factorize_logit=False)) == ref - V1 * W + V1 * k + k * W
    # tied at E == H: the output matrix disappears, its bias stays
    assert n_params(reference(name, tie_embeddings=True)) == ref - V1 * W
    # tied and factorised: one (V+1)×k table, the k×W embedding projection and a W×k output projection
    m = reference(name, embed_rank=k, tie_embeddings=True)
    assert n_params(m) == ref - 2 * V1 * W + V1 * k + 2 * k * W
    assert n_params(head(m)) == W * k + V1
    assert n_params(m.embed) == V1 * k + k * W


@pytest.mark.parametrize("name,H", [("updown", 1000), ("aoanet", 1024)])
def test_tied_output_projects_when_widths_differ(name, H):
    V1, E = 9488, 512
    untied, tied = reference(name, input_encoding_size=E), reference(name, input_encoding_size=E, tie_embeddings=True)
    assert n_params(tied) == n_params(untied) - H * V1 + H * E  # H×(V+1) matrix -> H×E projection
    assert tied.logit.proj.weight.shape == (E, H) and tied.logit.proj.bias is None
    assert reference(name, tie_embeddings=True).logit.proj is None  # E == H: nothing to project


def test_reduced_widths_and_depths():
    assert n_params(tiny("aoanet", refiner_layers=0).refiner) == 0
    for n in (1, 2):
        assert len(tiny("aoanet", refiner_layers=n).refiner.layers) == n
    m = tiny("transformer", enc_layers=1, dec_layers=1)
    assert len(m.encoder) == 1 and len(m.decoder) == 1 and len(m.init_state(m.prepare(*feats()))) == 2
    assert len(tiny("transformer", enc_layers=0).encoder) == 0
    # the example variant of the task: small Up-Down, factorised and tied
    u = reference("updown", embed_rank=64, tie_embeddings=True, rnn_size=256)
    assert u.logit.proj.weight.shape == (64, 256) and isinstance(u.embed, FactorizedEmbedding)


@pytest.mark.parametrize("name", DECODERS)
def test_bad_options_are_user_errors(name):
    for bad in (dict(embed_rank=0), dict(embed_rank="64"), dict(embed_rank=True), dict(tie_embeddings="yes"),
                dict(factorize_logit=1)):
        with pytest.raises(UserError, match=f"{name}: {next(iter(bad))}"):
            tiny(name, **bad)
    with pytest.raises(UserError, match="contradicts"):
        tiny(name, embed_rank=3, tie_embeddings=True, factorize_logit=False)
    if name == "aoanet":
        with pytest.raises(UserError, match="refiner_layers"):
            tiny(name, refiner_layers=-1)


# ---- tying: one tensor, used on both sides -----------------------------------------------------------

@pytest.mark.parametrize("name,variant", [(d, v) for d in DECODERS for v in ("tied", "tied-rank")])
def test_tied_table_is_one_tensor_used_by_the_output(name, variant):
    m = tiny(name, **VARIANTS[variant]).eval()
    table = embedding_table(m.embed)
    assert isinstance(head(m), TiedOutput) and table.shape[0] == V + 1
    owners = [n for n, p in m.named_parameters() if p is table]
    assert len(owners) == 1 and owners[0].startswith("embed.")
    assert set(m.state_dict()) == {n for n, _ in m.named_parameters()}  # nothing stored twice
    # pruning sees the table once: masks cover each prunable weight exactly once
    big = prunable(m)
    assert sum(p.numel() for p in big.values()) == sum(p.numel() for p in m.parameters() if p.dim() >= 2)
    assert len({p.data_ptr() for p in big.values()}) == len(big)
    masks = make_masks(m, "global", 0.5)
    assert sum(int((~mask).sum()) for mask in masks.values()) == round(0.5 * sum(p.numel() for p in big.values()))
    # the output reads the table: changing the row of a word never fed here changes that word's score
    fc, att = feats()
    with torch.no_grad():
        ctx = m.prepare(fc, att)
        before, _ = m.step(torch.zeros(3, dtype=torch.long), m.init_state(ctx), ctx)
        table[5] += torch.randn(table.shape[1])  # random: a LayerNorm output is blind to a constant shift
        after, _ = m.step(torch.zeros(3, dtype=torch.long), m.init_state(ctx), ctx)
    assert not torch.allclose(before[:, 5], after[:, 5])


# ---- depths: the contract runs at two layers everywhere ------------------------------------------------

@pytest.mark.parametrize("name,kw", [("aoanet", dict(refiner_layers=n)) for n in (0, 1)] + [
    ("transformer", dict(enc_layers=n, dec_layers=1)) for n in (0, 1)] + [
    ("transformer", dict(enc_layers=1, dec_layers=2, **VARIANTS["tied-rank"]))],
    ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}{v}" for k, v in x.items()))
def test_teacher_forcing_equals_stepping_at_other_depths(name, kw):
    assert_stepping_equals_teacher_forcing(tiny(name, **kw).eval())
