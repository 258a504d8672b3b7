"""Up-Down: reference parameter counts, teacher forcing vs stepping, registry and save/load."""
import pytest
import torch

from captioning.errors import UserError
from captioning.models import create_decoder, list_decoders, load_decoder, read_decoder_meta, save_decoder
from captioning.models.updown import UpDown


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(input_encoding_size=12, rnn_size=10, att_hid_size=6, drop_prob=0.0)
    cfg.update(kw)
    return create_decoder("updown", vocab_size=7, feat_dim=8, **cfg)


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


def test_only_plain_modules_hold_weights():
    """Compression relies on every weight living in nn.Linear / nn.LSTMCell / nn.Embedding."""
    m = tiny()
    owners = {type(mod) for mod in m.modules() if any(True for _ in mod.parameters(recurse=False))}
    assert owners == {torch.nn.Linear, torch.nn.LSTMCell, torch.nn.Embedding}


def test_teacher_forcing_equals_stepping():
    m = tiny().eval()
    fc, att = torch.randn(2, 8), torch.randn(2, 5, 8)
    seq = torch.tensor([[3, 1, 0, 0], [2, 2, 5, 4], [7, 0, 0, 0], [1, 2, 3, 0]])  # 2 captions per image
    with torch.no_grad():
        out = m(fc, att, seq)
        assert out.shape == (4, 5, 8)
        ctx = tuple(t.repeat_interleave(2, 0) for t in m.prepare(fc, att))
        state = m.init_state(ctx)
        tokens = torch.zeros(4, dtype=torch.long)
        for t in range(5):
            lp, state = m.step(tokens, state, ctx)
            torch.testing.assert_close(out[:, t], lp, rtol=0, atol=1e-6)
            if t < 4:
                tokens = seq[:, t]
    assert torch.allclose(out.exp().sum(-1), torch.ones(4, 5), atol=1e-5)


def test_dropout_is_active_only_in_training():
    m = tiny(drop_prob=0.5)
    fc, att, seq = torch.randn(2, 8), torch.randn(2, 5, 8), torch.tensor([[1, 2], [3, 0]])
    m.train()
    assert not torch.equal(m(fc, att, seq), m(fc, att, seq))
    m.eval()
    assert torch.equal(m(fc, att, seq), m(fc, att, seq))


def test_config_rebuilds_same_architecture():
    m = tiny()
    assert m.config["name"] == "updown" and isinstance(m, UpDown)
    m2 = create_decoder(**m.config)
    assert m2.config == m.config
    assert [p.shape for p in m2.parameters()] == [p.shape for p in m.parameters()]


def test_save_load_round_trip(tmp_path):
    m = tiny().eval()
    path = tmp_path / "m.safetensors"
    save_decoder(m, path, {"epoch": 3, "val_cider": 0.5})
    m2 = load_decoder(path)
    assert not m2.training and m2.config == m.config
    fc, att, seq = torch.randn(3, 8), torch.randn(3, 5, 8), torch.tensor([[1, 2, 0], [4, 5, 6], [7, 0, 0]])
    with torch.no_grad():
        assert torch.equal(m(fc, att, seq), m2(fc, att, seq))
    meta = read_decoder_meta(path)
    assert meta["epoch"] == 3 and meta["config"] == m.config


def test_unknown_decoder_and_setting_are_user_errors(tmp_path):
    assert "updown" in list_decoders()
    with pytest.raises(UserError, match="unknown decoder 'nope'.*updown"):
        create_decoder("nope", 10, 8)
    with pytest.raises(UserError, match="rnn_sise"):
        create_decoder("updown", 10, 8, rnn_sise=5)


def test_bad_decoder_files_are_user_errors(tmp_path):
    from captioning.io import save_tensors

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="junk.safetensors"):
        load_decoder(junk)
    other = tmp_path / "other.safetensors"
    save_tensors(other, {"x": torch.zeros(2)}, {"hello": 1})
    with pytest.raises(UserError, match="not a decoder file"):
        load_decoder(other)
    wrong = tmp_path / "wrong.safetensors"
    save_decoder(tiny(), wrong)
    save_tensors(wrong, {"x": torch.zeros(2)}, read_decoder_meta(wrong))
    with pytest.raises(UserError, match="do not match"):
        load_decoder(wrong)
    with pytest.raises(UserError, match="not found"):
        load_decoder(tmp_path / "missing.safetensors")
