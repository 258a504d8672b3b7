"""The decoder contract: every registered decoder, at a tiny size, passes the same checks.

A new family registers itself and adds one entry to ``SMALL``; the contract then runs on it. A
registered decoder without an entry fails loudly. The checks a model's shape could break (config,
stepping, search, save/load, int8, training) run on every architecture option in ``VARIANTS``
(factorised and/or tied embeddings). Checks of one family alone (reference parameter counts at the
COCO settings, its own options) stay in ``test_<family>.py``, what is particular to the options
(parameter savings, tying, bad values, depths) in test_arch_changes.py; all take ``tiny`` and
``feats`` from small_decoders.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioning.compress.quantize import roundtrip
from captioning.errors import UserError
from captioning.io import load_tensors, save_tensors
from captioning.models import create_decoder, list_decoders, load_decoder, read_decoder_meta, save_decoder
from captioning.models.embedding import embedding_table
from captioning.models.search import beam_search, greedy
from helpers import overfit
from small_decoders import (PLAIN, SEQ, SMALL, VARIANTS, assert_stepping_equals_teacher_forcing, feats, small,
                            tiny)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


@pytest.fixture(params=list_decoders())
def name(request):
    return request.param


def test_every_registered_decoder_has_small_settings():
    assert sorted(SMALL) == list_decoders()
    assert all(s.weights <= PLAIN for s in SMALL.values())


# ---- the registry ----------------------------------------------------------------------------------

def test_unknown_decoder_is_a_user_error():
    with pytest.raises(UserError, match=f"unknown decoder 'nope'; known: {', '.join(list_decoders())}$"):
        create_decoder("nope", 10, 8)


def test_unknown_setting_is_a_user_error(name):
    with pytest.raises(UserError, match=rf"decoder '{name}': unknown setting\(s\) rnn_sise; known: "):
        create_decoder(name, 10, 8, rnn_sise=5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_rebuilds_the_same_architecture(name, variant):
    m = tiny(name, **VARIANTS[variant])
    assert m.name == m.config["name"] == name
    assert all(m.config[key] == value for key, value in VARIANTS[variant].items())
    m2 = create_decoder(**m.config)
    assert type(m2) is type(m) and m2.config == m.config
    assert [(n, p.shape) for n, p in m2.named_parameters()] == [(n, p.shape) for n, p in m.named_parameters()]


# ---- the model -------------------------------------------------------------------------------------

def test_only_plain_modules_hold_weights(name):
    """Compression relies on every weight living in a module type it knows."""
    owners = {type(mod) for mod in tiny(name).modules() if any(True for _ in mod.parameters(recurse=False))}
    assert owners == small(name).weights


@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_forcing_equals_stepping(name, variant):
    assert_stepping_equals_teacher_forcing(tiny(name, **VARIANTS[variant]).eval())


def test_dropout_is_active_only_in_training(name):
    m = tiny(name, **small(name).dropout)
    fc, att = feats()
    seq = torch.tensor([[1, 2], [3, 0], [4, 4]])
    m.train()
    assert not torch.equal(m(fc, att, seq), m(fc, att, seq))
    m.eval()
    assert torch.equal(m(fc, att, seq), m(fc, att, seq))


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_and_beam_search(name, variant):
    m = tiny(name, **VARIANTS[variant]).eval()
    with torch.no_grad():
        getattr(m, small(name).head).bias[0] += 1.0  # make the end token likely: hypotheses of mixed lengths
    fc, att = feats(4, seed=3)
    with torch.no_grad():
        g = greedy(m, fc, att, max_length=6)
        assert torch.equal(beam_search(m, fc, att, beam_size=1, max_length=6), g)
        seqs, scores = beam_search(m, fc, att, beam_size=3, max_length=6, return_all=True)
        for i in range(4):  # batch-independent
            assert torch.equal(seqs[i:i + 1], beam_search(m, fc[i:i + 1], att[i:i + 1], beam_size=3,
                                                          max_length=6, return_all=True)[0])
        # each hypothesis' score is its teacher-forced log-probability: the reordered state is right
        for k in range(3):
            s = seqs[:, k]
            lp = m(fc, att, s)
            n = (s > 0).sum(1)
            tok = lp.gather(2, F.pad(s, (0, 1)).unsqueeze(2)).squeeze(2)
            keep = torch.arange(7) <= torch.where(n < 6, n, n - 1).unsqueeze(1)
            torch.testing.assert_close(scores[:, k], (tok * keep).sum(1), atol=1e-4, rtol=0)
    assert len(set((seqs > 0).sum(2).flatten().tolist())) >= 2
    assert (scores[:, :-1] >= scores[:, 1:]).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_weights_keep_outputs_close(name, variant):
    """Every variant's weights on the artifact's int8 grid (weight-only int8, as torch runs it) stay close."""
    m = tiny(name, **VARIANTS[variant]).eval()
    fc, att = feats()
    with torch.no_grad():
        want = m(fc, att, SEQ)
        m.load_state_dict(roundtrip({"d": m.state_dict()}, "int8")["d"])
        assert isinstance(embedding_table(m.embed), nn.Parameter)  # a tied table is still one tensor
        diff = (want - m(fc, att, SEQ)).abs().max().item()
        assert 0 < diff < 0.1
        assert greedy(m, fc, att, max_length=4).shape == (3, 4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_model_overfits_tiny_batch(name, variant):
    kw = {**VARIANTS[variant], **small(name).wider}
    factorised = "embed_rank" in kw
    if factorised:  # rank 4 fits slowly; at 8, 100 steps (AoANet with only its embedding factorised needs them)
        kw["embed_rank"] = 8
    m = tiny(name, **kw)
    fc, att = feats(2)
    seq = torch.tensor([[3, 1, 4, 1, 5], [2, 6, 5, 0, 0]])
    losses = overfit(m, fc, att, seq, small(name).lr, 100 if factorised else 60)
    assert losses[-1] < 0.01 * losses[0]
    with torch.no_grad():
        assert torch.equal(greedy(m.eval(), fc, att, max_length=5), seq)


# ---- files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(name, variant, tmp_path):
    m = tiny(name, **VARIANTS[variant]).eval()
    path = tmp_path / "m.safetensors"
    save_decoder(m, path, {"epoch": 3, "val_cider": 0.5})
    # safetensors refuses shared tensors: a tied table is stored once, under the embedding's name
    assert set(load_tensors(path)[0]) == {n for n, _ in m.named_parameters()}
    m2 = load_decoder(path)
    assert type(m2) is type(m) and m2.config == m.config and not m2.training
    fc, att = feats()
    with torch.no_grad():
        assert torch.equal(m(fc, att, SEQ), m2(fc, att, SEQ))
    meta = read_decoder_meta(path)
    assert meta["epoch"] == 3 and meta["val_cider"] == 0.5 and meta["config"] == m.config
    save_tensors(path, {"x": torch.zeros(2)}, meta)  # the same config over other weights
    with pytest.raises(UserError, match="do not match"):
        load_decoder(path)


def test_bad_decoder_files_are_user_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="junk.safetensors"):
        load_decoder(junk)
    other = tmp_path / "other.safetensors"
    save_tensors(other, {"x": torch.zeros(2)}, {"hello": 1})
    with pytest.raises(UserError, match="not a decoder file"):
        load_decoder(other)
    with pytest.raises(UserError, match="not found"):
        load_decoder(tmp_path / "missing.safetensors")
