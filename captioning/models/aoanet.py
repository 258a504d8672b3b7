"""AoANet captioner (Huang et al. 2019, "Attention on Attention for Image Captioning"), as in the reference code.

Follows AoAModel of ruotianluo/ImageCaptioning.pytorch at its COCO settings (configs/aoa.yml:
refiner with AoA and no feed-forward, AoA decoder, multi-head dot attention, mean-pooled
features, context dropout). "Attention on attention" gates an attention result ``a`` by the
query ``q`` it answered: ``AoA(a, q) = glu(W [a; q])`` = information * sigmoid(gate).

    a_i   = dropout(relu(att_embed(region i)))                  regions, H
    a     = a + dropout(AoA(mh_att(norm(a), norm(a), norm(a)), norm(a)))   per refiner layer
    a     = norm(a);  a_mean = mean_i a_i                       refined regions; fc is not used
    v, k  = split(ctx2att(a))                                   values and keys, A each
    x_t   = dropout(relu(embed(w_{t-1})))                       word, E
    h     = att_lstm([x_t, a_mean + dropout(ctx_{t-1})])        H
    ctx_t = AoA(mh_att(norm(h), k, v), h)                       H, fed back at the next step
    logp  = log_softmax(logit(dropout(ctx_t)))                  V+1 classes, 0 = end

In the decoder only the query is projected (the keys and values come from ``ctx2att``). At the
COCO settings (V=9487, E=H=A=1024, 8 heads, 6 refiner layers, 2048-d features) it has 85,562,640
parameters. Only plain nn.Embedding / nn.Linear / nn.LSTMCell / nn.LayerNorm hold weights, so
pruning, int8 storage and ONNX export see every one of them. ``embed_rank`` / ``tie_embeddings``
factorise or tie the word embedding and the output layer (see ``embedding.py``); smaller widths
and fewer refiner layers are just smaller settings.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import register_decoder
from .base import CaptionDecoder
from .embedding import check_options, logits, make_embedding, make_output


@dataclass
class AoANetConfig:
    vocab_size: int = 9487           # words; the output layer has one more class (0 = end)
    feat_dim: int = 2048             # encoder feature size C (att [B, N, C])
    input_encoding_size: int = 1024  # word embedding E
    rnn_size: int = 1024             # LSTM, region and context width H
    att_hid_size: int = 1024         # decoder attention keys/values A (the reference's rnn_size * multi_head_scale)
    num_heads: int = 8               # in the refiner and the decoder attention
    refiner_layers: int = 6          # 0 = no refiner (regions go straight to the decoder)
    drop_prob: float = 0.5           # on word/region embeddings, the fed-back context and the output
    att_dropout: float = 0.1         # on attention weights and refiner residuals
    aoa_dropout: float = 0.3         # on the input of the refiner's AoA gates
    ctx_drop: bool = True            # dropout on the context fed back into the LSTM
    embed_rank: int | None = None    # factorised embedding (V+1)×k + k×E (ALBERT); None = plain (V+1)×E
    factorize_logit: bool = True     # with embed_rank: also the output layer, H×k + k×(V+1)
    tie_embeddings: bool = False     # output layer reuses the embedding table (+ H->width projection if needed)


def multihead(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, drop: nn.Module) -> torch.Tensor:
    """Scaled dot-product attention of projected q [B, T, D] over k, v [B, S, D] in ``heads`` heads -> [B, T, D]."""
    # Each reshape reads its sizes from its own input, so ONNX Runtime turns the exported shape
    # arithmetic into a constant Reshape (its ReshapeFusion), as in the Transformer's attention
    D = q.shape[-1]
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, D // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = drop(F.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // heads), dim=-1))
    y = (weights @ v).transpose(1, 2)  # [B, T, h, D/h]
    return y.reshape(y.shape[0], y.shape[1], D)


class RefinerLayer(nn.Module):
    """Self-attention among the regions, gated by AoA, as a pre-norm residual sublayer."""

    def __init__(self, cfg: AoANetConfig):
        super().__init__()
        H = cfg.rnn_size
        self.norm = nn.LayerNorm(H)
        self.q, self.k, self.v = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.aoa = nn.Linear(2 * H, 2 * H)  # [attended; query] -> information and gate
        self.heads = cfg.num_heads
        self.att_drop = nn.Dropout(cfg.att_dropout)
        self.aoa_drop = nn.Dropout(cfg.aoa_dropout)
        self.res_drop = nn.Dropout(cfg.att_dropout)

    def forward(self, x):
        h = self.norm(x)
        a = multihead(self.q(h), self.k(h), self.v(h), self.heads, self.att_drop)
        a = F.glu(self.aoa(self.aoa_drop(torch.cat([a, h], -1))), dim=-1)
        return x + self.res_drop(a)


class Refiner(nn.Module):
    def __init__(self, cfg: AoANetConfig):
        super().__init__()
        self.layers = nn.ModuleList(RefinerLayer(cfg) for _ in range(cfg.refiner_layers))
        self.norm = nn.LayerNorm(cfg.rnn_size)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class AoADecoderCore(nn.Module):
    """One time step: attention LSTM, multi-head attention with its query, AoA -> context."""

    def __init__(self, cfg: AoANetConfig):
        super().__init__()
        E, H, A = cfg.input_encoding_size, cfg.rnn_size, cfg.att_hid_size
        self.att_lstm = nn.LSTMCell(E + H, H)       # input: [x_t, a_mean + ctx_{t-1}]
        self.query_norm = nn.LayerNorm(H)
        self.query = nn.Linear(H, A)
        self.att2ctx = nn.Linear(A + H, 2 * H)      # AoA: [attended; h] -> information and gate
        self.heads = cfg.num_heads
        self.att_drop = nn.Dropout(cfg.att_dropout)
        self.ctx_drop = nn.Dropout(cfg.drop_prob) if cfg.ctx_drop else nn.Identity()

    def forward(self, x, mean_feats, values, keys, state):
        h, c, ctx = state
        h, c = self.att_lstm(torch.cat([x, mean_feats + self.ctx_drop(ctx)], 1), (h, c))
        q = self.query(self.query_norm(h)).unsqueeze(1)                    # [B, 1, A]
        att = multihead(q, keys, values, self.heads, self.att_drop)[:, 0]  # [B, A]; squeeze(1) would export as an If
        ctx = F.glu(self.att2ctx(torch.cat([att, h], 1)), dim=1)         # [B, H]
        return ctx, (h, c, ctx)


@register_decoder("aoanet")
class AoANet(CaptionDecoder):
    config_class = AoANetConfig  # create_decoder checks each setting against its field's type and bounds
    config_keys = tuple(f.name for f in fields(AoANetConfig) if f.name not in ("vocab_size", "feat_dim"))

    def __init__(self, vocab_size: int = 9487, feat_dim: int = 2048, **kwargs):
        super().__init__()
        cfg = AoANetConfig(vocab_size=vocab_size, feat_dim=feat_dim, **kwargs)
        if cfg.rnn_size % cfg.num_heads or cfg.att_hid_size % cfg.num_heads:
            raise UserError(f"aoanet: rnn_size {cfg.rnn_size} and att_hid_size {cfg.att_hid_size} "
                            f"must be divisible by num_heads {cfg.num_heads}")
        if cfg.refiner_layers < 0:
            raise UserError(f"aoanet: refiner_layers must be >= 0, got {cfg.refiner_layers}")
        check_options(self.name, cfg.embed_rank, cfg.factorize_logit, cfg.tie_embeddings)
        self.cfg = cfg
        self.config = {"name": self.name, **asdict(cfg)}
        self.vocab_size = cfg.vocab_size
        H = cfg.rnn_size

        E = cfg.input_encoding_size
        self.embed = make_embedding(cfg.vocab_size + 1, E, cfg.embed_rank)
        self.att_embed = nn.Linear(cfg.feat_dim, H)
        self.refiner = Refiner(cfg) if cfg.refiner_layers > 0 else nn.Identity()
        self.ctx2att = nn.Linear(H, 2 * cfg.att_hid_size)
        self.core = AoADecoderCore(cfg)
        self.logit = make_output(H, cfg.vocab_size + 1, E, cfg.embed_rank, cfg.factorize_logit,
                                 cfg.tie_embeddings)
        self.drop = nn.Dropout(cfg.drop_prob)

    def prepare(self, fc, att):
        att = self.refiner(self.drop(F.relu(self.att_embed(att))))  # [B, N, H]
        values, keys = self.ctx2att(att).chunk(2, dim=-1)          # [B, N, A] each, computed once
        return att.mean(1), values.contiguous(), keys.contiguous()

    def init_state(self, ctx):
        zeros = ctx[0].new_zeros(ctx[0].shape[0], self.cfg.rnn_size)
        return (zeros,) * 3  # h, c of the LSTM and the previous context vector

    def step(self, tokens, state, ctx):
        x = self.drop(F.relu(self.embed(tokens)))
        out, state = self.core(x, *ctx, state)
        return F.log_softmax(logits(self.logit, self.embed, self.drop(out)), dim=1), state
