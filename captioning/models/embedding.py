"""The word embedding and output layer of a decoder, with two options that shrink them.

The two vocabulary matrices are a big share of a decoder: at the COCO settings the (V+1)×E
embedding and the H×(V+1) output layer hold 9.5M parameters each, over a third of Up-Down.

- Factorised (ALBERT, Lan et al. 2020), ``embed_rank=k``: the embedding becomes a (V+1)×k
  table followed by a k×E projection without bias, so (V+1)E -> (V+1)k + kE. With
  ``factorize_logit`` (the default) the output layer is factorised the same way: an H×k
  projection without bias, then a k×(V+1) layer with the bias.
- Tied (Press & Wolf 2017), ``tie_embeddings``: the output layer's weight *is* the embedding
  table (the (V+1)×k one when factorised), and it has only its own bias. When the hidden size
  fed to it differs from the table width, an H×width projection without bias goes first. A
  bias there would be redundant: W(Ph + b) + c = WPh + (Wb + c).

Tying is done by reading the table at call time (``F.linear``), not by sharing a module or a
Parameter: the state dict then holds the table once (safetensors refuses a tensor stored
twice), ``parameters()``, pruning and int8 storage see it once, and a pass that swaps
nn.Linear modules leaves it an embedding. So the decoder calls ``logits(output, embed, h)``.
The tied output's bias is then the one weight outside a plain torch module; it is 1-D, so
pruning and quantization leave it alone as they do every bias.

With both options off the layers are a plain nn.Embedding and nn.Linear, so the reference
parameter counts and checkpoint keys are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


def check_options(decoder: str, embed_rank, factorize_logit, tie_embeddings) -> None:
    """UserError for option values a config file may get wrong."""
    if embed_rank is not None and (isinstance(embed_rank, bool) or not isinstance(embed_rank, int)
                                   or embed_rank < 1):
        raise UserError(f"{decoder}: embed_rank must be a positive integer or null, got {embed_rank!r}")
    for key, value in (("factorize_logit", factorize_logit), ("tie_embeddings", tie_embeddings)):
        if not isinstance(value, bool):
            raise UserError(f"{decoder}: {key} must be true or false, got {value!r}")
    if embed_rank is not None and tie_embeddings and not factorize_logit:
        raise UserError(f"{decoder}: tie_embeddings with embed_rank ties the (V+1)×embed_rank tables, so "
                        "the output layer is factorised; factorize_logit: false contradicts it")


class FactorizedEmbedding(nn.Module):
    """(V+1)×k lookup, then a k×E projection without bias."""

    def __init__(self, num: int, dim: int, rank: int):
        super().__init__()
        self.table = nn.Embedding(num, rank)
        self.proj = nn.Linear(rank, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(tokens))


class FactorizedOutput(nn.Module):
    """H×k projection without bias, then a k×(V+1) layer with bias."""

    def __init__(self, hidden: int, num: int, rank: int):
        super().__init__()
        self.proj = nn.Linear(hidden, rank, bias=False)
        self.out = nn.Linear(rank, num)

    @property
    def bias(self) -> torch.Tensor:  # every output layer has ``.bias`` [V+1]
        return self.out.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(h))


class TiedOutput(nn.Module):
    """Logits from the embedding table it is given: ``table @ proj(h) + bias``; it owns no matrix of the vocabulary."""

    def __init__(self, hidden: int, width: int, num: int):
        super().__init__()
        self.proj = nn.Linear(hidden, width, bias=False) if hidden != width else None
        self.bias = nn.Parameter(torch.zeros(num))

    def forward(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            h = self.proj(h)
        return F.linear(h, table, self.bias)


def make_embedding(num: int, dim: int, rank: int | None = None) -> nn.Module:
    """Tokens [...] -> [..., dim]: nn.Embedding, or factorised through ``rank``."""
    return nn.Embedding(num, dim) if rank is None else FactorizedEmbedding(num, dim, rank)


def make_output(hidden: int, num: int, dim: int, rank: int | None = None, factorize: bool = True,
                tie: bool = False) -> nn.Module:
    """The output layer for hidden size ``hidden`` over ``num`` classes, given the embedding's ``dim`` and ``rank``."""
    if tie:
        return TiedOutput(hidden, dim if rank is None else rank, num)
    if rank is not None and factorize:
        return FactorizedOutput(hidden, num, rank)
    return nn.Linear(hidden, num)


def embedding_table(embed: nn.Module) -> torch.Tensor:
    """The (V+1)×width lookup matrix of an embedding made by ``make_embedding``: what tying shares."""
    return embed.table.weight if isinstance(embed, FactorizedEmbedding) else embed.weight


def logits(output: nn.Module, embed: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Unnormalised scores [..., V+1] of hidden states ``h``; a tied output reads ``embed``'s table."""
    if isinstance(output, TiedOutput):
        return output(h, embedding_table(embed))
    return output(h)


__all__ = ["check_options", "make_embedding", "make_output", "embedding_table", "logits",
           "FactorizedEmbedding", "FactorizedOutput", "TiedOutput"]
