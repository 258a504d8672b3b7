"""Up-Down captioner (Anderson et al. 2018, "Bottom-Up and Top-Down Attention"), as in the reference code.

Follows the TopDown/UpDown model of ruotianluo/ImageCaptioning.pytorch, whose COCO checkpoints the
compression paper starts from. Two LSTMs per word:

    x_t   = dropout(relu(embed(w_{t-1})))                      word, E
    h1    = att_lstm([h2_{t-1}, fc, x_t])                      "top-down" attention LSTM, H
    v_hat = sum_i softmax_i(alpha(tanh(p_att_i + h2att(h1)))) * att_i
    h2    = lang_lstm([v_hat, h1])                             language LSTM, H
    logp  = log_softmax(logit(dropout(h2)))                    V+1 classes, 0 = end

where fc = dropout(relu(fc_embed(mean feature))), att_i = dropout(relu(att_embed(region i))) and
p_att_i = ctx2att(att_i) are computed once per image in ``prepare``.

At the COCO settings (V=9487, E=H=1000, attention 512, 2048-d features) it has 52,125,025 parameters.
Only plain nn.Embedding / nn.Linear / nn.LSTMCell hold weights, so pruning, int8 storage and
ONNX export see every one of them. ``embed_rank`` / ``tie_embeddings`` factorise or tie the word
embedding and the output layer (see ``embedding.py``); smaller E, H and attention widths are
just smaller settings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from . import register_decoder
from .base import CaptionDecoder
from .embedding import check_options, logits, make_embedding, make_output


@dataclass
class UpDownConfig:
    vocab_size: int = 9487          # words; the output layer has one more class (0 = end)
    feat_dim: int = 2048            # encoder feature size C (fc [B, C], att [B, N, C])
    input_encoding_size: int = 1000  # word embedding E
    rnn_size: int = 1000            # both LSTMs' hidden size H
    att_hid_size: int = 512         # attention MLP width
    drop_prob: float = 0.5          # dropout on embeddings and on the language LSTM output
    embed_rank: int | None = None   # factorised embedding (V+1)×k + k×E (ALBERT); None = plain (V+1)×E
    factorize_logit: bool = True    # with embed_rank: also the output layer, H×k + k×(V+1)
    tie_embeddings: bool = False    # output layer reuses the embedding table (+ H->width projection if needed)


class Attention(nn.Module):
    """Additive attention over regions: the keys ``p_att`` are precomputed, the query is h1."""

    def __init__(self, cfg: UpDownConfig):
        super().__init__()
        self.h2att = nn.Linear(cfg.rnn_size, cfg.att_hid_size)
        self.alpha_net = nn.Linear(cfg.att_hid_size, 1)

    def forward(self, h: torch.Tensor, att: torch.Tensor, p_att: torch.Tensor) -> torch.Tensor:
        # h [B, H], att [B, N, H] (values), p_att [B, N, A] (keys)
        scores = self.alpha_net(torch.tanh(p_att + self.h2att(h).unsqueeze(1))).squeeze(2)  # [B, N]
        weights = F.softmax(scores, dim=1)
        return torch.bmm(weights.unsqueeze(1), att).squeeze(1)  # [B, H]


class UpDownCore(nn.Module):
    """One time step of the two LSTMs with attention between them."""

    def __init__(self, cfg: UpDownConfig):
        super().__init__()
        E, H = cfg.input_encoding_size, cfg.rnn_size
        self.att_lstm = nn.LSTMCell(H + H + E, H)  # input: [h2_{t-1}, fc, x_t]
        self.attention = Attention(cfg)
        self.lang_lstm = nn.LSTMCell(H + H, H)      # input: [v_hat, h1]

    def forward(self, x, fc, att, p_att, state):
        h_att, c_att, h_lang, c_lang = state
        h_att, c_att = self.att_lstm(torch.cat([h_lang, fc, x], 1), (h_att, c_att))
        v_hat = self.attention(h_att, att, p_att)
        h_lang, c_lang = self.lang_lstm(torch.cat([v_hat, h_att], 1), (h_lang, c_lang))
        return h_lang, (h_att, c_att, h_lang, c_lang)


@register_decoder("updown")
class UpDown(CaptionDecoder):
    config_class = UpDownConfig  # create_decoder checks each setting against its field's type and bounds
    config_keys = tuple(f.name for f in fields(UpDownConfig) if f.name not in ("vocab_size", "feat_dim"))

    def __init__(self, vocab_size: int = 9487, feat_dim: int = 2048, **kwargs):
        super().__init__()
        cfg = UpDownConfig(vocab_size=vocab_size, feat_dim=feat_dim, **kwargs)
        check_options(self.name, cfg.embed_rank, cfg.factorize_logit, cfg.tie_embeddings)
        self.cfg = cfg
        self.config = {"name": self.name, **asdict(cfg)}
        self.vocab_size = cfg.vocab_size
        E, H, C = cfg.input_encoding_size, cfg.rnn_size, cfg.feat_dim

        self.embed = make_embedding(cfg.vocab_size + 1, E, cfg.embed_rank)
        self.fc_embed = nn.Linear(C, H)
        self.att_embed = nn.Linear(C, H)
        self.ctx2att = nn.Linear(H, cfg.att_hid_size)
        self.core = UpDownCore(cfg)
        self.logit = make_output(H, cfg.vocab_size + 1, E, cfg.embed_rank, cfg.factorize_logit,
                                 cfg.tie_embeddings)
        self.drop = nn.Dropout(cfg.drop_prob)

    def prepare(self, fc, att):
        fc = self.drop(F.relu(self.fc_embed(fc)))     # [B, H]
        att = self.drop(F.relu(self.att_embed(att)))  # [B, N, H]
        return fc, att, self.ctx2att(att)             # keys [B, N, A] computed once

    def init_state(self, ctx):
        zeros = ctx[0].new_zeros(ctx[0].shape[0], self.cfg.rnn_size)
        return (zeros,) * 4  # h_att, c_att, h_lang, c_lang

    def step(self, tokens, state, ctx):
        x = self.drop(F.relu(self.embed(tokens)))
        out, state = self.core(x, *ctx, state)
        return F.log_softmax(logits(self.logit, self.embed, self.drop(out)), dim=1), state
