"""Decoder architecture options (factorised / tied embeddings, small widths and depths) on every decoder.

Counts are checked at the reference sizes on the meta device (no memory, no init cost); every
behaviour test uses tiny models.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioning.compress.prune import make_masks, prunable
from captioning.compress.quantize import apply_runtime
from captioning.errors import UserError
from captioning.io import load_tensors
from captioning.models import create_decoder, load_decoder, save_decoder
from captioning.models.embedding import FactorizedEmbedding, TiedOutput, embedding_table
from captioning.models.search import beam_search, greedy
from captioning.training.xe import sequence_loss

V, C = 7, 8
DECODERS = ("updown", "aoanet", "transformer")
# reference parameter count and the width W = E = H of the vocabulary matrices at the COCO settings
REFERENCE = {"updown": (52_125_025, 1000), "aoanet": (85_562_640, 1024), "transformer": (54_914_832, 512)}
TINY = {
    "updown": dict(input_encoding_size=12, rnn_size=10, att_hid_size=6, drop_prob=0.0),
    "aoanet": dict(input_encoding_size=12, rnn_size=16, att_hid_size=8, num_heads=4, refiner_layers=1,
                   drop_prob=0.0, att_dropout=0.0, aoa_dropout=0.0),
    "transformer": dict(d_model=16, d_ff=24, num_heads=4, enc_layers=1, dec_layers=1, dropout=0.0, drop_prob=0.0),
}
OPTIONS = {
    "rank": dict(embed_rank=3),
    "rank-plain-logit": dict(embed_rank=3, factorize_logit=False),
    "tied": dict(tie_embeddings=True),
    "tied-rank": dict(embed_rank=3, tie_embeddings=True),
}
CASES = [(d, o) for d in DECODERS for o in OPTIONS]
SEQ = torch.tensor([[1, 2, 0], [4, 5, 6], [7, 0, 0]])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def tiny(name, option=None, **kw):
    torch.manual_seed(0)
    cfg = {**TINY[name], **(OPTIONS[option] if option else {}), **kw}
    return create_decoder(name, vocab_size=V, feat_dim=C, **cfg)


def reference(name, **kw):
    with torch.device("meta"):
        return create_decoder(name, vocab_size=9487, feat_dim=2048, **kw)


def n_params(module):
    return sum(p.numel() for p in module.parameters())  # a shared Parameter counts once


def head(m):
    return m.generator if m.name == "transformer" else m.logit


def feats(b=3, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, generator=g), torch.randn(b, n, C, generator=g)


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


@pytest.mark.parametrize("name,option", CASES)
def test_config_rebuilds_the_same_architecture(name, option):
    m = tiny(name, option)
    for key, value in OPTIONS[option].items():
        assert m.config[key] == value
    m2 = create_decoder(**m.config)
    assert [(n, p.shape) for n, p in m2.named_parameters()] == [(n, p.shape) for n, p in m.named_parameters()]


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

@pytest.mark.parametrize("name,option", [(d, o) for d in DECODERS for o in ("tied", "tied-rank")])
def test_tied_table_is_one_tensor_used_by_the_output(name, option):
    m = tiny(name, option).eval()
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


# ---- behaviour with every option -----------------------------------------------------------------------

STEP_CASES = CASES + [("aoanet", None, dict(refiner_layers=n)) for n in (0, 2)] + [
    ("transformer", None, dict(enc_layers=0, dec_layers=1)), ("transformer", "tied-rank", dict(dec_layers=2))]


@pytest.mark.parametrize("case", [c if len(c) == 3 else (*c, {}) for c in STEP_CASES],
                         ids=lambda c: "-".join([c[0], c[1] or "plain"] + [f"{k}{v}" for k, v in c[2].items()]))
def test_teacher_forcing_equals_stepping(case):
    name, option, kw = case
    m = tiny(name, option, **kw).eval()
    fc, att = feats(2)
    seq = torch.tensor([[3, 1, 0, 0], [2, 2, 5, 4], [7, 0, 0, 0], [1, 2, 3, 0]])  # 2 captions per image
    with torch.no_grad():
        out = m(fc, att, seq)
        assert out.shape == (4, 5, V + 1)
        ctx = tuple(t.repeat_interleave(2, 0) for t in m.prepare(fc, att))
        state = m.init_state(ctx)
        tokens = torch.zeros(4, dtype=torch.long)
        for t in range(5):
            lp, state = m.step(tokens, state, ctx)
            torch.testing.assert_close(out[:, t], lp, rtol=0, atol=1e-5)
            if t < 4:
                tokens = seq[:, t]
    assert torch.allclose(out.exp().sum(-1), torch.ones(4, 5), atol=1e-5)


@pytest.mark.parametrize("name,option", CASES)
def test_greedy_and_beam_search(name, option):
    m = tiny(name, option).eval()
    with torch.no_grad():
        head(m).bias[0] += 1.0  # make the end token likely: hypotheses of mixed lengths
    fc, att = feats(4, seed=3)
    with torch.no_grad():
        g = greedy(m, fc, att, max_length=6)
        assert torch.equal(beam_search(m, fc, att, beam_size=1, max_length=6), g)
        seqs, scores = beam_search(m, fc, att, beam_size=3, max_length=6, return_all=True)
        for k in range(3):  # each score is the hypothesis' teacher-forced log-probability
            s = seqs[:, k]
            lp = m(fc, att, s)
            n = (s > 0).sum(1)
            tok = lp.gather(2, F.pad(s, (0, 1)).unsqueeze(2)).squeeze(2)
            keep = torch.arange(7) <= torch.where(n < 6, n, n - 1).unsqueeze(1)
            torch.testing.assert_close(scores[:, k], (tok * keep).sum(1), atol=1e-4, rtol=0)
    assert (scores[:, :-1] >= scores[:, 1:]).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("name,option", CASES)
def test_save_load_round_trip(name, option, tmp_path):
    m = tiny(name, option).eval()
    path = tmp_path / "m.safetensors"
    save_decoder(m, path)  # safetensors refuses shared tensors: tying must not share one
    tensors, _ = load_tensors(path)
    assert set(tensors) == {n for n, _ in m.named_parameters()}
    m2 = load_decoder(path)
    assert m2.config == m.config
    fc, att = feats()
    with torch.no_grad():
        assert torch.equal(m(fc, att, SEQ), m2(fc, att, SEQ))


@pytest.mark.parametrize("name,option", CASES)
def test_dynamic_int8_quantization_runs(name, option):
    m = tiny(name, option).eval()
    fc, att = feats()
    with torch.no_grad():
        want = m(fc, att, SEQ)
        q = apply_runtime(m, "int8")
        assert not any(type(mod) in (nn.Linear, nn.LSTMCell) for mod in q.modules())
        assert isinstance(embedding_table(q.embed), nn.Parameter)  # the table stays a float embedding
        got = q(fc, att, SEQ)
        diff = (want - got).abs().max().item()
        assert 0 < diff < 0.1
        assert greedy(q, fc, att, max_length=4).shape == (3, 4)


@pytest.mark.parametrize("name,option", CASES)
def test_tiny_model_overfits_tiny_batch(name, option):
    wider = {"updown": dict(input_encoding_size=16, rnn_size=32, att_hid_size=16),
             "aoanet": dict(input_encoding_size=16, rnn_size=32, att_hid_size=32),
             "transformer": dict(d_model=32, d_ff=64)}[name]
    m = tiny(name, option, **wider, embed_rank=8) if "rank" in option else tiny(name, option, **wider)
    fc, att = feats(2)
    seq = torch.tensor([[3, 1, 4, 1, 5], [2, 6, 5, 0, 0]])
    opt = torch.optim.Adam(m.parameters(), lr=5e-3 if name != "transformer" else 3e-3)
    losses = []
    for _ in range(150 if name == "updown" else 100):  # Up-Down is slower here, with no option set too
        loss = sequence_loss(m(fc, att, seq), seq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]
    with torch.no_grad():
        assert torch.equal(greedy(m.eval(), fc, att, max_length=5), seq)
