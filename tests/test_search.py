"""Greedy, beam search and sampling: agreement with each other and with teacher-forced scores."""
import itertools

import pytest
import torch

from captioning.models import create_decoder
from captioning.models.search import beam_search, greedy, sample

V, C = 4, 6  # a tiny vocabulary makes the end token likely and exhaustive search possible


def feats(b=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, generator=g), torch.randn(b, 3, C, generator=g)


def random_model(seed, end_bias):
    torch.manual_seed(seed)
    m = create_decoder("updown", vocab_size=V, feat_dim=C, input_encoding_size=8, rnn_size=8,
                       att_hid_size=4, drop_prob=0.0).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2)  # larger weights: the features matter more
        m.logit.bias[0] += end_bias
    return m


def model(seed=0):
    """A random model whose greedy captions have mixed lengths, so words, early ends and
    max-length captions all occur. Random tiny models tend to always or never end, so
    look through seeds and end-token biases until one does."""
    fc, att = feats(8, 99)
    for s in range(100 * seed, 100 * seed + 100):
        for end_bias in (0.0, 0.5, 1.0, 1.5):
            m = random_model(s, end_bias)
            with torch.no_grad():
                n = (greedy(m, fc, att, max_length=6) > 0).sum(1)
            if len(set(n.tolist())) >= 3 and (n == 6).any() and (n < 6).any():
                return m
    raise AssertionError("no suitable random model")


def seq_score(m, fc, att, seq):
    """Sum of teacher-forced log-probs of each row: its words, plus its end token if it has one."""
    with torch.no_grad():
        lp = m(fc, att, seq)  # [B, T+1, V+1]
    target = torch.nn.functional.pad(seq, (0, 1))
    tok = lp.gather(2, target.unsqueeze(2)).squeeze(2)
    n = (seq > 0).sum(1)
    keep = torch.arange(seq.shape[1] + 1) <= n.unsqueeze(1)
    keep &= torch.arange(seq.shape[1] + 1) < seq.shape[1] + (n < seq.shape[1]).long().unsqueeze(1)
    return (tok * keep).sum(1)


def assert_zero_padded(seq):
    for row in seq.tolist():
        if 0 in row:
            assert all(w == 0 for w in row[row.index(0):]), row


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_is_greedy(seed):
    m, (fc, att) = model(seed), feats(8, 99)
    with torch.no_grad():
        g = greedy(m, fc, att, max_length=6)
        assert torch.equal(beam_search(m, fc, att, beam_size=1, max_length=6), g)
    assert g.shape == (8, 6)
    assert_zero_padded(g)
    assert (g[:, 0] > 0).any() and (g == 0).any()  # the test sees both words and ends


def test_beam_hypotheses_sorted_valid_and_scored_right():
    m, (fc, att) = random_model(0, end_bias=-1.0), feats(8, 99)
    with torch.no_grad():
        seqs, scores = beam_search(m, fc, att, beam_size=3, max_length=6, return_all=True)
        best = beam_search(m, fc, att, beam_size=3, max_length=6)
    n = (seqs > 0).sum(2)
    assert (n == 6).any() and ((n > 0) & (n < 6)).any()  # long and ended hypotheses both occur
    assert seqs.shape == (8, 3, 6) and scores.shape == (8, 3)
    assert torch.equal(best, seqs[:, 0])
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert torch.isfinite(scores).all()
    for k in range(3):
        assert_zero_padded(seqs[:, k])
        torch.testing.assert_close(scores[:, k], seq_score(m, fc, att, seqs[:, k]), atol=1e-4, rtol=0)
    for i in range(8):  # distinct hypotheses per image
        assert len({tuple(s) for s in seqs[i].tolist()}) == 3


def test_wide_beam_finds_the_exact_best_caption():
    """With K >= (V+1)^(max_length-1) beam search is exhaustive: compare with brute force."""
    max_length = 3
    m, (fc, att) = model(4), feats(8, 99)
    fc, att = fc[:3], att[:3]
    cands = []
    for n in range(1, max_length + 1):
        for words in itertools.product(range(1, V + 1), repeat=n):
            cands.append(list(words) + [0] * (max_length - n))
    cands.append([0] * max_length)
    cands = torch.tensor(cands)
    with torch.no_grad():
        best = beam_search(m, fc, att, beam_size=(V + 1) ** (max_length - 1), max_length=max_length)
        pool, pool_scores = beam_search(m, fc, att, beam_size=(V + 1) ** (max_length - 1), max_length=max_length,
                                        return_all=True)
    for i in range(3):
        s = seq_score(m, fc[i:i + 1].expand(len(cands), -1), att[i:i + 1].expand(len(cands), -1, -1), cands)
        assert torch.equal(best[i], cands[s.argmax()])
        top = s.sort(descending=True).values[:10]  # the returned hypotheses are the true top ones
        torch.testing.assert_close(pool_scores[i, :10], top, atol=1e-4, rtol=0)


def test_beam_search_is_batch_independent_and_deterministic():
    m, (fc, att) = model(5), feats(8, 99)
    with torch.no_grad():
        full = beam_search(m, fc, att, beam_size=3, max_length=8)
        assert torch.equal(full, beam_search(m, fc, att, beam_size=3, max_length=8))
        for i in range(5):
            assert torch.equal(full[i:i + 1], beam_search(m, fc[i:i + 1], att[i:i + 1], beam_size=3, max_length=8))


def test_sample_logprobs_match_teacher_forcing_and_are_reproducible():
    m, (fc, att) = model(6), feats(8, 99)
    seq, lp = sample(m, fc, att, n=4, max_length=6, generator=torch.Generator().manual_seed(0))
    assert seq.shape == lp.shape == (32, 6) and lp.requires_grad
    assert_zero_padded(seq)
    seq2, _ = sample(m, fc, att, n=4, max_length=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seq, seq2)
    assert len({tuple(s) for s in seq.tolist()}) > 3  # really sampled
    rep = lambda t: t.repeat_interleave(4, 0)  # noqa: E731
    torch.testing.assert_close(lp.sum(1).detach(), seq_score(m, rep(fc), rep(att), seq), atol=1e-4, rtol=0)
    lp.sum().backward()
    assert m.logit.weight.grad is not None and m.logit.weight.grad.abs().sum() > 0


def test_low_temperature_sampling_is_greedy():
    m, (fc, att) = model(7), feats(8, 99)
    with torch.no_grad():
        s, _ = sample(m, fc, att, n=1, temperature=1e-3, max_length=6, generator=torch.Generator().manual_seed(1))
        assert torch.equal(s, greedy(m, fc, att, max_length=6))
