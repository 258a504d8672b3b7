"""AoANet: reference parameter counts, stepping vs teacher forcing, search, save/load, training."""
import pytest
import torch

from captioning.errors import UserError
from captioning.models import create_decoder, load_decoder, save_decoder
from captioning.models.aoanet import AoANet
from captioning.models.search import beam_search, greedy
from captioning.training.xe import sequence_loss

V, C = 7, 8
REF = 85_562_640


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(input_encoding_size=12, rnn_size=16, att_hid_size=8, num_heads=4, refiner_layers=2,
               drop_prob=0.0, att_dropout=0.0, aoa_dropout=0.0)
    cfg.update(kw)
    return create_decoder("aoanet", vocab_size=V, feat_dim=C, **cfg)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def feats(b=3, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, generator=g), torch.randn(b, n, C, generator=g)


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
    assert n_params(tiny(refiner_layers=0).refiner) == 0
    assert len(tiny(refiner_layers=3).refiner.layers) == 3
    m = tiny(att_hid_size=12)
    assert m.ctx2att.out_features == 24 and m.core.query.out_features == 12
    with pytest.raises(UserError, match="num_heads"):
        tiny(att_hid_size=10)
    with pytest.raises(UserError, match="refine_aoa"):
        tiny(refine_aoa=1)


def test_only_plain_modules_hold_weights():
    owners = {type(mod) for mod in tiny().modules() if any(True for _ in mod.parameters(recurse=False))}
    assert owners == {torch.nn.Linear, torch.nn.LSTMCell, torch.nn.Embedding, torch.nn.LayerNorm}


def test_teacher_forcing_equals_stepping():
    m = tiny().eval()
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


def test_uses_refined_regions_not_fc():
    m = tiny().eval()
    fc, att = feats()
    seq = torch.tensor([[1, 2, 0], [4, 5, 6], [7, 0, 0]])
    with torch.no_grad():
        out = m(fc, att, seq)
        assert torch.equal(out, m(torch.randn_like(fc), att, seq))  # as in the reference: mean-pooled regions
        mean, values, keys = m.prepare(fc, att)
        refined = m.refiner(torch.relu(m.att_embed(att)))
        torch.testing.assert_close(mean, refined.mean(1))
        torch.testing.assert_close(torch.cat([values, keys], -1), m.ctx2att(refined))
        m.refiner.layers[0].aoa.weight.mul_(2)  # the refiner is on the path
        assert not torch.allclose(out, m(fc, att, seq))


def test_greedy_and_beam_search():
    m = tiny().eval()
    with torch.no_grad():
        m.logit.bias[0] += 1.0  # make the end token likely: hypotheses of mixed lengths
    fc, att = feats(4, seed=3)
    with torch.no_grad():
        g = greedy(m, fc, att, max_len=6)
        assert torch.equal(beam_search(m, fc, att, beam_size=1, max_len=6), g)
        seqs, scores = beam_search(m, fc, att, beam_size=3, max_len=6, return_all=True)
        for i in range(4):  # batch-independent
            assert torch.equal(seqs[i:i + 1], beam_search(m, fc[i:i + 1], att[i:i + 1], beam_size=3,
                                                          max_len=6, return_all=True)[0])
        for k in range(3):  # each score is the hypothesis' teacher-forced log-probability
            s = seqs[:, k]
            lp = m(fc, att, s)
            n = (s > 0).sum(1)
            tok = lp.gather(2, torch.nn.functional.pad(s, (0, 1)).unsqueeze(2)).squeeze(2)
            keep = torch.arange(7) <= torch.where(n < 6, n, n - 1).unsqueeze(1)
            torch.testing.assert_close(scores[:, k], (tok * keep).sum(1), atol=1e-4, rtol=0)
    assert len(set((seqs > 0).sum(2).flatten().tolist())) >= 2
    assert (scores[:, :-1] >= scores[:, 1:]).all() and torch.isfinite(scores).all()


def test_save_load_round_trip(tmp_path):
    m = tiny().eval()
    path = tmp_path / "m.safetensors"
    save_decoder(m, path, {"epoch": 2})
    m2 = load_decoder(path)
    assert isinstance(m2, AoANet) and m2.config == m.config and not m2.training
    fc, att = feats()
    seq = torch.tensor([[1, 2, 0], [4, 5, 6], [7, 0, 0]])
    with torch.no_grad():
        assert torch.equal(m(fc, att, seq), m2(fc, att, seq))


def test_dropout_is_active_only_in_training():
    m = tiny(drop_prob=0.5, att_dropout=0.1, aoa_dropout=0.3)
    fc, att = feats()
    seq = torch.tensor([[1, 2], [3, 0], [4, 4]])
    m.train()
    assert not torch.equal(m(fc, att, seq), m(fc, att, seq))
    m.eval()
    assert torch.equal(m(fc, att, seq), m(fc, att, seq))


def test_dynamic_int8_quantization_keeps_outputs_close():
    m = tiny().eval()
    q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear, torch.nn.LSTMCell}, dtype=torch.qint8)
    assert not any(type(mod) in (torch.nn.Linear, torch.nn.LSTMCell) for mod in q.modules())
    fc, att = feats()
    seq = torch.tensor([[1, 2, 0], [4, 5, 6], [7, 0, 0]])
    with torch.no_grad():
        diff = (m(fc, att, seq) - q(fc, att, seq)).abs().max().item()
    assert 0 < diff < 0.1


def test_tiny_model_overfits_tiny_batch():
    m = tiny(rnn_size=32, att_hid_size=32, input_encoding_size=16)
    fc, att = feats(2)
    seq = torch.tensor([[3, 1, 4, 1, 5], [2, 6, 5, 0, 0]])
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
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
