"""Up-Down: the reference parameter counts. The contract every decoder passes is in test_decoders.py."""
from captioning.models import create_decoder


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_reference_parameter_count_and_breakdown():
    m = create_decoder("updown", vocab_size=9487, feat_dim=2048)
    assert n_params(m) == 52_125_025
    assert n_params(m.embed) == 9_488_000  # (V+1) x E, no bias
    assert n_params(m.fc_embed) == 2_049_000
    assert n_params(m.att_embed) == 2_049_000
    assert n_params(m.logit) == 9_497_488
    assert n_params(m.ctx2att) == 512_512
    assert n_params(m.core) == 28_529_025
    assert n_params(m.core.att_lstm) == 16_008_000
    assert n_params(m.core.lang_lstm) == 12_008_000
    assert n_params(m.core.attention.h2att) == 512_512
    assert n_params(m.core.attention.alpha_net) == 513
    # NOTES.md: one more feature dimension adds 2,000 parameters, one more word 2,001.
    assert n_params(create_decoder("updown", 9487, 2049)) - 52_125_025 == 2000
    assert n_params(create_decoder("updown", 9488, 2048)) - 52_125_025 == 2001
