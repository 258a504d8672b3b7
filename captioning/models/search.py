"""Decoding for any ``CaptionDecoder``: greedy, beam search and sampling, batched over images.

All three return captions as LongTensor [B, max_length], 0-padded after the end token; a caption
that never ends fills all ``max_length`` slots (as the reference does). Greedy and beam search are
deterministic; call them under ``torch.no_grad()`` in eval mode. Sampling keeps the graph so
self-critical training can back-propagate through the returned log-probabilities.
"""
from __future__ import annotations

import torch

from .base import CaptionDecoder, repeat_per_row


def greedy(decoder: CaptionDecoder, fc: torch.Tensor, att: torch.Tensor, max_length: int) -> torch.Tensor:
    """The arg-max word at every step."""
    ctx = decoder.prepare(fc, att)
    state = decoder.init_state(ctx)
    tokens = fc.new_zeros(fc.shape[0], dtype=torch.long)
    seq = fc.new_zeros(fc.shape[0], max_length, dtype=torch.long)
    alive = torch.ones_like(tokens, dtype=torch.bool)
    for t in range(max_length):
        logprobs, state = decoder.step(tokens, state, ctx)
        tokens = logprobs.topk(1, dim=1).indices.squeeze(1) * alive  # same tie-breaking as beam search
        seq[:, t] = tokens
        alive &= tokens != 0
        if not alive.any():
            break
    return seq


def beam_search(decoder: CaptionDecoder, fc: torch.Tensor, att: torch.Tensor, beam_size: int,
                max_length: int, return_all: bool = False):
    """Keep the ``beam_size`` best partial captions per image; return the best finished one [B, max_length].

    Scores are summed log-probabilities, the end token's included, with no length penalty (the
    reference default). As in the reference, a beam that emits the end token leaves the search
    as a finished hypothesis and the others go on; at ``max_length`` the surviving beams finish as
    they are. The search stops early once no live beam can beat the finished ones (log-probs
    only fall). With ``return_all`` it returns (seqs [B, K, max_length], scores [B, K]) sorted best
    first; a score of -inf marks padding when fewer than K hypotheses exist. Beam 1 == greedy.
    """
    B, K = fc.shape[0], beam_size
    ctx = repeat_per_row(decoder.prepare(fc, att), K)   # [B*K, ...], expanded once
    state = decoder.init_state(ctx)
    tokens = fc.new_zeros(B * K, dtype=torch.long)
    neg_inf = float("-inf")

    live_seq = fc.new_zeros(B, K, max_length, dtype=torch.long)
    live_score = fc.new_full((B, K), neg_inf, dtype=torch.float32)
    live_score[:, 0] = 0.0                               # all K beams start identical: keep one
    done_seq = fc.new_zeros(B, K, max_length, dtype=torch.long)
    done_score = fc.new_full((B, K), neg_inf, dtype=torch.float32)
    rows = torch.arange(B, device=fc.device).unsqueeze(1)

    for t in range(max_length):
        logprobs, state = decoder.step(tokens, state, ctx)
        V1 = logprobs.shape[1]
        cand = (live_score.unsqueeze(2) + logprobs.float().view(B, K, V1)).view(B, K * V1)
        score, ix = cand.topk(K, dim=1)                  # [B, K], best first
        beam, word = ix // V1, ix % V1

        live_seq = live_seq[rows, beam]
        live_seq[:, :, t] = word
        state = tuple(s.index_select(0, (beam + rows * K).view(-1)) for s in state)

        ended = (word == 0) if t < max_length - 1 else torch.ones_like(word, dtype=torch.bool)
        new_score = torch.where(ended, score, torch.full_like(score, neg_inf))
        merged_score, order = torch.cat([done_score, new_score], 1).sort(dim=1, descending=True, stable=True)
        done_score = merged_score[:, :K]
        done_seq = torch.cat([done_seq, live_seq], 1)[rows, order[:, :K]]

        live_score = torch.where(ended, torch.full_like(score, neg_inf), score)
        if (live_score.max(1).values <= done_score[:, -1]).all():
            break
        tokens = word.view(-1)

    if return_all:
        return done_seq, done_score
    return done_seq[:, 0]


def sample(decoder: CaptionDecoder, fc: torch.Tensor, att: torch.Tensor, n: int = 1, *, max_length: int,
           temperature: float = 1.0, generator: torch.Generator | None = None):
    """Draw ``n`` captions per image from the decoder's distribution (softened by ``temperature``).

    Returns (seq [B*n, max_length], logprobs [B*n, max_length]); rows i*n .. i*n+n-1 belong to image i.
    ``logprobs[r, t]`` is the log-probability of ``seq[r, t]`` under the tempered distribution,
    the end token's included, and 0 after it. Gradients flow through ``logprobs``. A ``generator``
    must live on the same device as ``fc``.
    """
    ctx = repeat_per_row(decoder.prepare(fc, att), n)
    rows = fc.shape[0] * n
    state = decoder.init_state(ctx)
    tokens = fc.new_zeros(rows, dtype=torch.long)
    seq = fc.new_zeros(rows, max_length, dtype=torch.long)
    out = []
    alive = torch.ones(rows, dtype=torch.bool, device=fc.device)
    for t in range(max_length):
        logprobs, state = decoder.step(tokens, state, ctx)
        if temperature != 1.0:
            logprobs = torch.log_softmax(logprobs / temperature, dim=1)
        tokens = torch.multinomial(logprobs.detach().exp(), 1, generator=generator).squeeze(1) * alive
        seq[:, t] = tokens
        out.append(logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1) * alive)
        alive = alive & (tokens != 0)
        if not alive.any():
            break
    lp = torch.stack(out, 1)
    if lp.shape[1] < max_length:
        lp = torch.cat([lp, lp.new_zeros(rows, max_length - lp.shape[1])], 1)
    return seq, lp
