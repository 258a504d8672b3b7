"""Transformer captioner (Vaswani et al. 2017) over region features, as in the reference code.

Follows TransformerModel of ruotianluo/ImageCaptioning.pytorch (itself "The Annotated
Transformer"): the encoder self-attends over the embedded regions, the decoder is a causal
Transformer over the words that also attends to the encoder output (the "memory"):

    memory = encoder(dropout(relu(att_embed(regions))))          [B, N, d], computed once per image
    x_t    = embed(w_{t-1}) * sqrt(d) + sinusoid(t)               word plus position
    x      = x + self_attn(norm(x))   over positions <= t         per decoder layer: pre-norm
    x      = x + cross_attn(norm(x))  over memory                  sublayers with residuals
    x      = x + ffn(norm(x))
    logp   = log_softmax(generator(norm(x)))                       V+1 classes, 0 = end

The fc feature is not used. At the COCO settings (V=9487, 6+6 layers, d=512, ff=2048, 8 heads,
2048-d features, untied generator) it has 54,914,832 parameters.

Stepping is incremental: ``prepare`` runs the encoder and projects the memory to every decoder
layer's cross-attention keys and values once; the state holds each layer's self-attention keys
and values of the positions seen so far, [B, t, d], so one step costs O(t), not O(t^2). The
teacher-forced ``forward`` runs the same layers over all positions at once with a causal mask.
Only plain nn.Linear / nn.Embedding / nn.LayerNorm hold weights, so pruning, int8 storage and
ONNX export see every one of them. ``embed_rank`` / ``tie_embeddings`` factorise or tie the word
embedding and the generator (see ``embedding.py``); fewer or narrower layers are just smaller settings.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import register_decoder
from .base import CaptionDecoder, repeat_per_row
from .embedding import check_options, logits, make_embedding, make_output


@dataclass
class TransformerConfig:
    vocab_size: int = 9487          # words; the output layer has one more class (0 = end)
    feat_dim: int = 2048            # encoder feature size C (att [B, N, C])
    d_model: int = 512              # width of every layer
    d_ff: int = 2048                # hidden width of the feed-forward sublayers
    num_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dropout: float = 0.1            # on attention weights, sublayer outputs and the word embedding
    drop_prob: float = 0.5          # after the region embedding (the reference's drop_prob_lm)
    embed_rank: int | None = None   # factorised embedding (V+1)×k + k×d (ALBERT); None = plain (V+1)×d
    factorize_logit: bool = True    # with embed_rank: also the generator, d×k + k×(V+1)
    tie_embeddings: bool = False    # generator reuses the word embedding table (then it has no own matrix)


def sinusoid(positions: torch.Tensor, d: int) -> torch.Tensor:
    """Fixed positional encoding [T, d]: sin on even, cos on odd channels, wavelengths 2pi .. 10000*2pi."""
    freq = torch.exp(torch.arange(0, d, 2, device=positions.device) * (-math.log(10000.0) / d))
    angle = positions.float().unsqueeze(1) * freq                      # [T, d/2]
    return torch.stack([angle.sin(), angle.cos()], dim=2).flatten(1)   # interleave: sin, cos, sin, ...


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with separate q/k/v/out projections.

    Keys and values are projected by the caller through ``self.k`` / ``self.v`` so they can be
    computed once and cached (memory in ``prepare``, past positions in the decoder state).
    """

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        # x [B, T, d] queries (unprojected); k, v [B, S, d] projected; mask [T, S], True = may attend
        # Each reshape reads its sizes from its own input, so ONNX Runtime turns the exported shape
        # arithmetic into a constant Reshape (its ReshapeFusion): a third fewer ops per decoding step
        d = x.shape[-1]
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(k), split(v)                     # [B, h, T|S, d/h]
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)     # [B, h, T, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = self.drop(F.softmax(scores, dim=-1))
        y = (weights @ v).transpose(1, 2)                                  # [B, T, h, d/h]
        return self.out(y.reshape(y.shape[0], y.shape[1], d))


class FeedForward(nn.Module):
    def __init__(self, d: int, d_ff: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(d, d_ff)
        self.w2 = nn.Linear(d_ff, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.w2(self.drop(F.relu(self.w1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = MultiHeadAttention(d, cfg.num_heads, cfg.dropout)
        self.ffn = FeedForward(d, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, self.self_attn.k(h), self.self_attn.v(h)))
        return x + self.drop(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    """One decoder layer over T new positions, given the K/V of the positions before them."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = MultiHeadAttention(d, cfg.num_heads, cfg.dropout)
        self.cross_attn = MultiHeadAttention(d, cfg.num_heads, cfg.dropout)
        self.ffn = FeedForward(d, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, past_k, past_v, mem_k, mem_v, mask=None):
        # x [B, T, d]; past_k/v [B, t, d]; mem_k/v [B, N, d]; mask [T, t+T] or None (attend to all)
        h = self.norm1(x)
        k = torch.cat([past_k, self.self_attn.k(h)], 1)
        v = torch.cat([past_v, self.self_attn.v(h)], 1)
        x = x + self.drop(self.self_attn(h, k, v, mask))
        x = x + self.drop(self.cross_attn(self.norm2(x), mem_k, mem_v))
        x = x + self.drop(self.ffn(self.norm3(x)))
        return x, k, v


@register_decoder("transformer")
class Transformer(CaptionDecoder):
    config_class = TransformerConfig  # create_decoder checks each setting against its field's type and bounds
    config_keys = tuple(f.name for f in fields(TransformerConfig) if f.name not in ("vocab_size", "feat_dim"))

    def __init__(self, vocab_size: int = 9487, feat_dim: int = 2048, **kwargs):
        super().__init__()
        cfg = TransformerConfig(vocab_size=vocab_size, feat_dim=feat_dim, **kwargs)
        if cfg.d_model % 2 or cfg.d_model % cfg.num_heads:  # sin/cos channel pairs; equal head widths
            raise UserError(f"transformer: d_model {cfg.d_model} must be even and divisible by "
                            f"num_heads {cfg.num_heads}")
        if cfg.dec_layers < 1 or cfg.enc_layers < 0:  # the cache length is the position counter
            raise UserError("transformer: dec_layers must be >= 1 and enc_layers >= 0")
        check_options(self.name, cfg.embed_rank, cfg.factorize_logit, cfg.tie_embeddings)
        self.cfg = cfg
        self.config = {"name": self.name, **asdict(cfg)}
        self.vocab_size = cfg.vocab_size
        d = cfg.d_model

        self.att_embed = nn.Linear(cfg.feat_dim, d)
        self.att_drop = nn.Dropout(cfg.drop_prob)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.enc_norm = nn.LayerNorm(d)
        self.embed = make_embedding(cfg.vocab_size + 1, d, cfg.embed_rank)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.dec_norm = nn.LayerNorm(d)
        self.generator = make_output(d, cfg.vocab_size + 1, d, cfg.embed_rank, cfg.factorize_logit,
                                     cfg.tie_embeddings)

        for p in self.parameters():  # Glorot init of every matrix, as in the reference
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    # ---- pieces shared by stepping and teacher forcing ----

    def _embed_words(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens [B, T] at positions start .. start+T-1 -> [B, T, d]."""
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) * math.sqrt(self.cfg.d_model) + sinusoid(pos, self.cfg.d_model)
        return self.embed_drop(x)

    def _decode(self, x, state, ctx, mask=None):
        """Run the decoder layers; returns log-probabilities [B, T, V+1] and the grown K/V cache."""
        new_state = []
        for i, layer in enumerate(self.decoder):
            x, k, v = layer(x, state[2 * i], state[2 * i + 1], ctx[2 * i], ctx[2 * i + 1], mask)
            new_state += [k, v]
        return F.log_softmax(logits(self.generator, self.embed, self.dec_norm(x)), dim=-1), tuple(new_state)

    # ---- the CaptionDecoder interface ----

    def prepare(self, fc, att):
        x = self.att_drop(F.relu(self.att_embed(att)))  # [B, N, d]
        for layer in self.encoder:
            x = layer(x)
        memory = self.enc_norm(x)
        ctx = []
        for layer in self.decoder:  # cross-attention keys/values: once per image, not per step
            ctx += [layer.cross_attn.k(memory), layer.cross_attn.v(memory)]
        return tuple(ctx)

    def init_state(self, ctx):
        empty = ctx[0].new_zeros(ctx[0].shape[0], 0, self.cfg.d_model)
        return (empty,) * (2 * self.cfg.dec_layers)  # per layer: self-attention K, V of past positions

    def step(self, tokens, state, ctx):
        x = self._embed_words(tokens.unsqueeze(1), start=state[0].shape[1])
        logprobs, state = self._decode(x, state, ctx)  # one new position attends to all cached ones
        return logprobs[:, 0], state  # not squeeze(1): that exports as an If, run at every word

    def forward(self, fc, att, seq):
        """Teacher forcing in one pass over all positions (causal mask); same contract as the base class."""
        n_img, n_rows = fc.shape[0], seq.shape[0]
        if n_rows % n_img:
            raise ValueError(f"seq has {n_rows} rows, not a multiple of the {n_img} images")
        ctx = repeat_per_row(self.prepare(fc, att), n_rows // n_img)
        tokens = torch.cat([seq.new_zeros(n_rows, 1), seq], 1)  # BOS, then the words
        T = tokens.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
        logprobs, _ = self._decode(self._embed_words(tokens, 0), self.init_state(ctx), ctx, causal)
        return logprobs
