"""The one interface every caption decoder implements, so search, training and compression never look inside.

Token convention (as in the reference implementation, ruotianluo/ImageCaptioning.pytorch):
words are 1..V and token 0 plays two roles. As an *input* it is BOS: the first step is fed 0.
As an *output* it is the end token, and captions are 0-padded after it. A decoder therefore
predicts V+1 classes.

A decoder is driven one step at a time:

    ctx = decoder.prepare(fc, att)         # once per image: embedded features, attention keys ...
    state = decoder.init_state(ctx)        # e.g. LSTM h/c, or the tokens seen so far
    logprobs, state = decoder.step(tokens, state, ctx)   # tokens [B] -> logprobs [B, V+1]

``ctx`` and ``state`` are tuples of tensors whose dim 0 is the batch. That is all beam search
needs: it repeats ``ctx`` per beam once and reorders ``state`` with ``index_select(0, ...)``.
"""
from __future__ import annotations

import torch
from torch import nn

Ctx = tuple[torch.Tensor, ...]
State = tuple[torch.Tensor, ...]


def repeat_per_row(tensors: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """Repeat every row ``n`` times in place order (row i -> rows i*n .. i*n+n-1)."""
    if n == 1:
        return tuple(tensors)
    return tuple(t.repeat_interleave(n, dim=0) for t in tensors)


class CaptionDecoder(nn.Module):
    """Base class: subclasses implement ``prepare``, ``init_state`` and ``step``; ``forward`` comes free.

    Subclasses set ``self.config``: a JSON-able dict with "name" and every constructor kwarg,
    so that ``captioning.models.create_decoder(**decoder.config)`` rebuilds the same architecture.
    """

    name: str = ""
    config: dict
    vocab_size: int  # number of words V; the output has V+1 classes (0 = end)

    def prepare(self, fc: torch.Tensor, att: torch.Tensor) -> Ctx:
        """Per-image work done once: fc [B, C], att [B, N, C] -> tuple of tensors, batch first."""
        raise NotImplementedError

    def init_state(self, ctx: Ctx) -> State:
        """The state before the first word, batch first."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State, ctx: Ctx) -> tuple[torch.Tensor, State]:
        """Feed one token per row (0 = BOS at the first step); return log-probabilities [B, V+1] and the new state."""
        raise NotImplementedError

    def forward(self, fc: torch.Tensor, att: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Teacher forcing.

        ``seq`` [B*k, T] holds target captions, 0-padded, without BOS; with k > 1 rows
        i*k .. i*k+k-1 belong to image i (several captions per image share one ``prepare``).
        Inputs are ``[0, seq[:, 0], ..., seq[:, T-1]]``. Returns log-probabilities [B*k, T+1, V+1]:
        position t < T predicts ``seq[:, t]`` and position T predicts the end token 0, so a
        caption that fills all T slots still learns to stop. Positions after a caption's end
        token are garbage and must be masked by the loss (see ``captioning.training.xe``).
        """
        n_img, n_rows = fc.shape[0], seq.shape[0]
        if n_rows % n_img:
            raise ValueError(f"seq has {n_rows} rows, not a multiple of the {n_img} images")
        ctx = repeat_per_row(self.prepare(fc, att), n_rows // n_img)
        state = self.init_state(ctx)
        tokens = seq.new_zeros(n_rows)
        out = []
        for t in range(seq.shape[1] + 1):
            logprobs, state = self.step(tokens, state, ctx)
            out.append(logprobs)
            if t < seq.shape[1]:
                tokens = seq[:, t]
        return torch.stack(out, dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
