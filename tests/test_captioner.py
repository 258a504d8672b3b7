"""Captioner + artifact: a quantized model in memory and the same model loaded from its artifact agree exactly."""
from pathlib import Path

import pytest
import torch
from torch import nn

from captioning.captioner import Captioner, load_captioner, pack_model, quantize_captioner, stored_groups
from captioning.compress import artifact
from captioning.compress.quantize import QUANT_MODES, roundtrip
from captioning.errors import UserError
from captioning.evaluation.evaluate import count_params
from helpers import prune_smallest

IMAGES = sorted((Path(__file__).parent / "data" / "coco5" / "train2014").glob("*.jpg"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _captioner(zeros=0.0):
    from captioning.encoders import create_encoder
    from captioning.models import create_decoder

    enc = create_encoder("mobilenetv3_small_050", img_size=64)
    dec = create_decoder("updown", vocab_size=30, feat_dim=enc.feat_dim, input_encoding_size=32,
                         rnn_size=32, att_hid_size=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than the default init, so captions depend on the image
        for p in dec.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))
    if zeros:
        prune_smallest(enc, zeros), prune_smallest(dec, zeros)
    return Captioner(enc, dec, {i: f"w{i}" for i in range(1, 31)}, max_length=10)


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _logprobs(cap, images, steps=3):
    """Encoder features and the decoder's log-probabilities over a few greedy steps."""
    with torch.no_grad():
        fc, att = cap.encoder(images)
        ctx = cap.decoder.prepare(fc, att)
        state, tokens, out = cap.decoder.init_state(ctx), torch.zeros(len(images), dtype=torch.long), []
        for _ in range(steps):
            lp, state = cap.decoder.step(tokens, state, ctx)
            out.append(lp)
            tokens = lp.argmax(1)
    return fc, torch.stack(out)


@pytest.mark.parametrize("zeros", [0.0, 0.8])
@pytest.mark.parametrize("mode", QUANT_MODES)
def test_loaded_artifact_equals_in_memory_quantized_model(tmp_path, images, mode, zeros):
    cap = _captioner(zeros)
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, max_length=10, quantization=mode)
    loaded, memory = load_captioner(tmp_path / "m.capz"), quantize_captioner(cap, mode)
    assert loaded.quantization == memory.quantization == mode
    assert loaded.config["runtime"] == {"quantization": mode, "engine": "torch"}
    (fa, la), (fb, lb) = _logprobs(loaded, images), _logprobs(memory, images)
    assert torch.equal(fa, fb) and torch.equal(la, lb)
    assert loaded.caption_images(images) == memory.caption_images(images)
    # the encoder's batch norms are folded into its convolutions before storage (compress.fold)
    stored = loaded.state_groups()
    expected = roundtrip(stored_groups(cap.encoder, cap.state_groups()["decoder"]), mode)
    for g in ("encoder", "decoder"):
        assert stored[g].keys() == expected[g].keys()
        assert all(torch.equal(stored[g][k], expected[g][k]) for k in expected[g])
        if zeros:  # pruned weights come back exactly zero
            orig = cap.state_groups()[g]
            assert all((stored[g][k][orig[k] == 0] == 0).all() for k in orig if orig[k].ndim >= 2)


def test_int8_decoder_computes_in_float_and_stays_close_to_fp32(images):
    cap = _captioner()
    q = quantize_captioner(cap, "int8")
    assert type(q.decoder.logit) is nn.Linear and type(q.decoder.core.att_lstm) is nn.LSTMCell  # weight-only int8
    assert not torch.equal(q.decoder.logit.weight, cap.decoder.logit.weight)  # on the int8 grid
    (fa, la), (fb, lb) = _logprobs(cap, images), _logprobs(q, images)
    assert 0 < (la - lb).abs().max() < 0.1  # int8 really changes the weights, and stays close
    assert (fa - fb).abs().max() < 0.05 * fa.abs().max()
    assert len(q.caption_images(images, beam_size=3)) == len(images)


def test_int8_state_groups_count_like_fp32():
    cap = _captioner(zeros=0.5)
    q = quantize_captioner(cap, "int8")
    groups = q.state_groups()
    assert all(t.dtype == torch.float32 for g in groups.values() for t in g.values() if t.is_floating_point())
    total, nonzero = count_params(q)
    total_fp32, nonzero_fp32 = count_params(cap)
    assert total == total_fp32
    # int8 rounds a few tiny weights to zero; pruning's zeros all stay
    assert 0.95 * nonzero_fp32 <= nonzero <= nonzero_fp32 < total


def test_int8_artifact_computes_in_fp32(tmp_path):
    cap = _captioner()
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, cap.max_length, quantization="int8")
    loaded = load_captioner(tmp_path / "m.capz")
    assert loaded.quantization == "int8" and all(p.dtype == torch.float32 for p in loaded.parameters())
    captions = loaded.caption_files(IMAGES[:2], beam_size=2)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_fp16_artifact_computes_in_fp32(tmp_path):
    cap = _captioner()
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, cap.max_length, quantization="fp16")
    loaded = load_captioner(tmp_path / "m.capz")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    w = loaded.decoder.logit.weight
    assert torch.equal(w, cap.decoder.logit.weight.half().float())


def test_unknown_quantization_is_a_user_error(tmp_path):
    cap = _captioner()
    with pytest.raises(UserError, match="int4"):
        pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, cap.max_length, quantization="int4")
    with pytest.raises(UserError, match="int4"):
        quantize_captioner(cap, "int4")
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, cap.max_length)
    config, groups = artifact.read(tmp_path / "m.capz")
    artifact.pack(tmp_path / "bad.capz", groups, {**config, "runtime": {"quantization": "int4"}})
    with pytest.raises(UserError, match=r"bad\.capz: unknown quantization 'int4'"):
        load_captioner(tmp_path / "bad.capz")


def test_artifact_whose_weights_do_not_fit_its_config_is_a_user_error(tmp_path):
    cap = _captioner()
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, cap.max_length)
    config, groups = artifact.read(tmp_path / "m.capz")
    artifact.pack(tmp_path / "bad.capz", groups, {**config, "decoder": {**config["decoder"], "rnn_size": 8}})
    with pytest.raises(UserError, match=r"bad\.capz: decoder weights do not match"):
        load_captioner(tmp_path / "bad.capz")
    artifact.pack(tmp_path / "bad.capz", groups, {k: v for k, v in config.items() if k != "vocab"})
    with pytest.raises(UserError, match="bad.capz: artifact config is incomplete"):
        load_captioner(tmp_path / "bad.capz")


def test_max_length_travels_with_the_artifact(tmp_path):
    """The caption length limit is stored (key ``max_len``) and read back; there is no default."""
    cap = _captioner()
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, max_length=7)
    loaded = load_captioner(tmp_path / "m.capz")
    assert loaded.config["max_len"] == loaded.max_length == 7
    assert quantize_captioner(loaded, "fp16").max_length == 7
    config, groups = artifact.read(tmp_path / "m.capz")
    artifact.pack(tmp_path / "old.capz", groups, {k: v for k, v in config.items() if k != "max_len"})
    with pytest.raises(UserError, match=r"^\S*old\.capz: no 'max_len' \(the caption length limit\)$"):
        load_captioner(tmp_path / "old.capz")
    for bad in (0, "16", 2.5, True, 1001):
        artifact.pack(tmp_path / "bad.capz", groups, {**config, "max_len": bad})
        with pytest.raises(UserError, match=r"bad\.capz: 'max_len' must be an integer >= 1"):
            load_captioner(tmp_path / "bad.capz")
    with pytest.raises(UserError, match="'max_length' must be an integer >= 1 and <= 1000, got 0"):
        pack_model(tmp_path / "zero.capz", cap.encoder, cap.decoder, cap.itow, max_length=0)
    assert not (tmp_path / "zero.capz").exists()
