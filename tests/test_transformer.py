"""Transformer: reference parameter counts, cached stepping vs causal teacher forcing, search, save/load, training."""
import pytest
import torch
import torch.nn.functional as F

from captioning.errors import UserError
from captioning.models import create_decoder, load_decoder, save_decoder
from captioning.models.search import beam_search, greedy
from captioning.models.transformer import Transformer
from captioning.training.xe import sequence_loss

V, C = 7, 8
REF = 54_914_832


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(d_model=16, d_ff=24, num_heads=4, enc_layers=2, dec_layers=2, dropout=0.0, drop_prob=0.0)
    cfg.update(kw)
    return create_decoder("transformer", vocab_size=V, feat_dim=C, **cfg)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def feats(b=3, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, generator=g), torch.randn(b, n, C, generator=g)


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
    t = tiny(tie_embeddings=True).eval()
    fc, att = feats()
    with torch.no_grad():
        ctx = t.prepare(fc, att)
        before, _ = t.step(torch.zeros(3, dtype=torch.long), t.init_state(ctx), ctx)
        t.embed.weight[5] += torch.randn(16)  # token 5 is never fed here, so only the output side sees it
        after, _ = t.step(torch.zeros(3, dtype=torch.long), t.init_state(ctx), ctx)
    assert not torch.allclose(before[:, 5], after[:, 5])


def test_only_plain_modules_hold_weights():
    owners = {type(mod) for mod in tiny().modules() if any(True for _ in mod.parameters(recurse=False))}
    assert owners == {torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm}


@pytest.mark.parametrize("tie", [False, True])
def test_cached_stepping_equals_causal_teacher_forcing(tie):
    m = tiny(tie_embeddings=tie).eval()
    fc, att = feats(2)
    seq = torch.tensor([[3, 1, 0, 0], [2, 2, 5, 4], [7, 0, 0, 0], [1, 2, 3, 0]])  # 2 captions per image
    with torch.no_grad():
        out = m(fc, att, seq)
        assert out.shape == (4, 5, V + 1)
        ctx = tuple(t.repeat_interleave(2, 0) for t in m.prepare(fc, att))
        state = m.init_state(ctx)
        assert all(s.shape == (4, 0, 16) for s in state) and len(state) == 4
        tokens = torch.zeros(4, dtype=torch.long)
        for t in range(5):
            lp, state = m.step(tokens, state, ctx)
            assert all(s.shape == (4, t + 1, 16) for s in state)  # one cached position per step
            torch.testing.assert_close(out[:, t], lp, rtol=0, atol=1e-5)
            if t < 4:
                tokens = seq[:, t]
        # the parallel pass is the base class's step loop, done at once
        torch.testing.assert_close(out, super(Transformer, m).forward(fc, att, seq), rtol=0, atol=1e-5)
    assert torch.allclose(out.exp().sum(-1), torch.ones(4, 5), atol=1e-5)


def test_earlier_positions_do_not_see_later_words():
    m = tiny().eval()
    fc, att = feats(1)
    a, b = torch.tensor([[3, 1, 4, 1]]), torch.tensor([[3, 1, 6, 6]])
    with torch.no_grad():
        oa, ob = m(fc, att, a), m(fc, att, b)
    torch.testing.assert_close(oa[:, :3], ob[:, :3], rtol=0, atol=1e-6)  # inputs 0,3,1 are shared
    assert not torch.allclose(oa[:, 3:], ob[:, 3:])


def test_greedy_and_beam_search_work_with_the_cache():
    m = tiny().eval()
    with torch.no_grad():
        m.generator.bias[0] += 1.5  # make the end token likely: hypotheses of mixed lengths
    fc, att = feats(4, seed=3)
    with torch.no_grad():
        g = greedy(m, fc, att, max_len=6)
        assert torch.equal(beam_search(m, fc, att, beam_size=1, max_len=6), g)
        seqs, scores = beam_search(m, fc, att, beam_size=3, max_len=6, return_all=True)
        for i in range(4):  # batch-independent
            assert torch.equal(seqs[i:i + 1], beam_search(m, fc[i:i + 1], att[i:i + 1], beam_size=3,
                                                          max_len=6, return_all=True)[0])
        # each hypothesis' score is its teacher-forced log-probability: the reordered cache is right
        for k in range(3):
            s = seqs[:, k]
            lp = m(fc, att, s)
            n = (s > 0).sum(1)
            tok = lp.gather(2, F.pad(s, (0, 1)).unsqueeze(2)).squeeze(2)
            keep = torch.arange(7) <= torch.where(n < 6, n, n - 1).unsqueeze(1)
            torch.testing.assert_close(scores[:, k], (tok * keep).sum(1), atol=1e-4, rtol=0)
    lengths = (seqs > 0).sum(2)
    assert len(set(lengths.flatten().tolist())) >= 2
    assert (scores[:, :-1] >= scores[:, 1:]).all() and torch.isfinite(scores).all()


def test_save_load_round_trip(tmp_path):
    for tie in (False, True):
        m = tiny(tie_embeddings=tie).eval()
        path = tmp_path / f"m{tie}.safetensors"
        save_decoder(m, path, {"epoch": 1})
        m2 = load_decoder(path)
        assert m2.config == m.config and not m2.training
        fc, att = feats()
        seq = torch.tensor([[1, 2, 0], [4, 5, 6], [7, 0, 0]])
        with torch.no_grad():
            assert torch.equal(m(fc, att, seq), m2(fc, att, seq))


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="num_heads"):
        create_decoder("transformer", V, C, d_model=18, num_heads=4)
    with pytest.raises(UserError, match="dec_layers"):
        create_decoder("transformer", V, C, d_model=16, num_heads=4, dec_layers=0)
    with pytest.raises(UserError, match="n_layers"):
        create_decoder("transformer", V, C, n_layers=2)


def test_dropout_is_active_only_in_training():
    m = tiny(dropout=0.1, drop_prob=0.5)
    fc, att = feats()
    seq = torch.tensor([[1, 2], [3, 0], [4, 4]])
    m.train()
    assert not torch.equal(m(fc, att, seq), m(fc, att, seq))
    m.eval()
    assert torch.equal(m(fc, att, seq), m(fc, att, seq))


def test_dynamic_int8_quantization_keeps_outputs_close():
    m = tiny().eval()
    q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    assert not any(type(mod) is torch.nn.Linear for mod in q.modules())
    fc, att = feats()
    seq = torch.tensor([[1, 2, 0], [4, 5, 6], [7, 0, 0]])
    with torch.no_grad():
        diff = (m(fc, att, seq) - q(fc, att, seq)).abs().max().item()
    assert 0 < diff < 0.1


def test_tiny_model_overfits_tiny_batch():
    m = tiny(d_model=32, d_ff=64)
    fc, att = feats(2)
    seq = torch.tensor([[3, 1, 4, 1, 5], [2, 6, 5, 0, 0]])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = sequence_loss(m(fc, att, seq), seq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]
    with torch.no_grad():
        assert torch.equal(greedy(m.eval(), fc, att, max_len=5), seq)
