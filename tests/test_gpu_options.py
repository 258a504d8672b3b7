"""GPU options of training (amp, pin_memory): no-ops on a CPU, and their CUDA code paths exercised anyway.

There is no GPU on the development machine, so the CUDA-only paths run here by stand-ins: fake
``pin_memory``/``to`` methods record what ``to_device`` would do with a CUDA device, and a CPU
entry in ``amp.AMP_DTYPES`` (bfloat16) switches on the very autocast + GradScaler path that CUDA
takes. On a machine with CUDA the amp tests run on the GPU itself.
"""
import math

import pytest
import torch

from captioning.compress.prune import Pruner, measured_sparsity
from captioning.errors import UserError
from captioning.io import load_tensors, read_json, save_tensors
from captioning.models import read_decoder_meta
from captioning.training import amp
from captioning.training.loader import Batch, to_device
from captioning.training.scst import train_scst
from captioning.training.amp import MixedPrecision, optimizer_step
from captioning.training.checkpoint import run_files
from captioning.training.xe import train_xe

from helpers import TINY, make_dataset

FAST = dict(batch_size=3, lr=1e-2, max_length=8, seed=0, progress=False)
NOTE = "amp is a no-op on cpu"


@pytest.fixture(autouse=True)
def fresh_note_and_threads(monkeypatch):
    """Each test sees the one-time amp note as if first; train_* set torch's thread count, restore it."""
    monkeypatch.setattr(amp, "_amp_noted", set())
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def amp_device(monkeypatch) -> str:
    """CUDA when present; else the CPU with the CUDA path switched on (bf16 autocast + a real GradScaler)."""
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setitem(amp.AMP_DTYPES, "cpu", torch.bfloat16)
    return "cpu"


def final_weights(out):
    """The weights after the last epoch (the resume file; out_path holds the best epoch)."""
    tensors, _ = load_tensors(run_files(out)[0])
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def same_weights(a: dict, b: dict, exact: bool = True) -> bool:
    if a.keys() != b.keys():
        return False
    if exact:
        return all(torch.equal(a[k], b[k]) for k in a)
    return all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4) for k in a)


def batch() -> Batch:
    return Batch(ids=[7, 8], fc=torch.randn(2, 3), att=torch.randn(2, 4, 3), labels=torch.ones(10, 5, dtype=torch.long))


# ---- pin_memory: to_device ------------------------------------------------------------------------

def test_to_device_leaves_cpu_tensors_alone():
    b = batch()
    for pin in (False, True):
        out = to_device(b, "cpu", pin)
        assert out.ids == [7, 8] and out.fc is b.fc and out.att is b.att and out.labels is b.labels
    t = torch.zeros(3)
    assert to_device(t, torch.device("cpu"), pin_memory=True) is t


def test_to_device_pins_and_copies_asynchronously_for_cuda(monkeypatch):
    calls = []

    def fake_pin(self):
        calls.append(("pin", tuple(self.shape)))
        return self

    def fake_to(self, device, non_blocking=False):
        calls.append(("to", str(device), non_blocking))
        return self

    b = batch()
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    to_device(b, "cuda", pin_memory=True)
    pinned = calls[:]
    calls.clear()
    to_device(b, torch.device("cuda", 0), pin_memory=False)
    plain = calls[:]
    monkeypatch.undo()
    assert pinned == [("pin", (2, 3)), ("to", "cuda", True), ("pin", (2, 4, 3)), ("to", "cuda", True),
                      ("pin", (10, 5)), ("to", "cuda", True)]
    assert plain == [("to", "cuda:0", False)] * 3


# ---- one optimizer step with a loss scaler ---------------------------------------------------------

def _one_step(scaler, loss_factor=1.0, device="cpu"):
    """One SGD(lr=1) step of a linear layer through ``optimizer_step``: (weight change, what the hooks saw)."""
    lin = torch.nn.Linear(4, 3).to(device)
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(-0.3, 0.3, 12).view(3, 4))
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    seen = {}

    def before(m):
        seen["grad"] = m.weight.grad.clone()
        m.weight.grad[0] = 0.0  # a "pruned" row

    def after(m):
        seen["after"] = True

    x = torch.tensor([[1.0, -0.5, 0.25, 0.1], [0.3, 0.2, -0.1, 0.05]], device=device)
    w0 = lin.weight.detach().clone()
    loss = loss_factor * lin(x).pow(2).sum()
    optimizer_step(loss, lin, opt, scaler, 0.1, before, after)
    return w0 - lin.weight.detach(), seen


def test_optimizer_step_unscales_before_masking_and_clipping():
    plain, seen_plain = _one_step(torch.amp.GradScaler("cpu", enabled=False))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaled, seen_scaled = _one_step(scaler)
    # hooks and clipping see the true gradients, so a scaled step equals a plain one
    assert torch.equal(seen_scaled["grad"], seen_plain["grad"]) and torch.equal(scaled, plain)
    g = seen_plain["grad"][1:].abs()
    assert (g > 0.1).any() and ((g > 0) & (g < 0.1)).any()      # some entries clipped, some not
    assert plain.abs().max() == pytest.approx(0.1) and (plain[0] == 0).all()
    assert seen_plain["after"] and seen_scaled["after"]
    # a step whose scaled gradients overflow is skipped, and the scale backs off
    skipped, seen = _one_step(scaler, loss_factor=1e38)
    assert (skipped == 0).all() and seen["after"] and scaler.get_scale() == 2.0 ** 9


# ---- amp: a no-op on a CPU -----------------------------------------------------------------------------

def test_amp_and_pin_memory_are_noops_on_cpu(tmp_path, capsys):
    feats, prep = make_dataset(tmp_path)
    kw = dict(FAST, device="cpu", keep_resume=True)
    plain, opts = tmp_path / "plain" / "xe.safetensors", tmp_path / "opts" / "xe.safetensors"
    rp = train_xe(feats, prep, plain, "updown", TINY, epochs=2, **kw)
    assert NOTE not in capsys.readouterr().err
    ro = train_xe(feats, prep, opts, "updown", TINY, epochs=2, amp=True, pin_memory=True, **kw)
    assert capsys.readouterr().err.count(NOTE) == 1
    assert same_weights(final_weights(plain), final_weights(opts))
    assert [h["loss"] for h in rp["history"]] == [h["loss"] for h in ro["history"]]
    # the settings (resume matching) and the checkpoint name the options only when set
    assert "amp" not in rp["settings"] and "pin_memory" not in rp["settings"]
    assert ro["settings"] == {**rp["settings"], "amp": True, "pin_memory": True}
    assert "amp" not in read_decoder_meta(plain) and "pin_memory" not in read_decoder_meta(plain)
    assert read_decoder_meta(opts)["amp"] is True and read_decoder_meta(opts)["pin_memory"] is True
    assert "amp_scaler" not in load_tensors(run_files(opts)[0])[1]  # no scaler in use, none saved

    # SCST too; the note is not repeated, and SCST records its own options, not its init's
    sk = dict(FAST, device="cpu", keep_resume=True, sample_n=3)
    a, b = tmp_path / "scst_plain" / "m.safetensors", tmp_path / "scst_opts" / "m.safetensors"
    sa = train_scst(opts, feats, prep, a, epochs=1, **sk)
    sb = train_scst(opts, feats, prep, b, epochs=1, amp=True, pin_memory=True, **sk)
    assert NOTE not in capsys.readouterr().err
    assert same_weights(final_weights(a), final_weights(b))
    assert sb["settings"] == {**sa["settings"], "amp": True, "pin_memory": True}
    assert "amp" not in read_decoder_meta(a) and read_decoder_meta(b)["pin_memory"] is True


def test_the_note_is_printed_once_per_process(capsys):
    MixedPrecision(True, "cpu", "xe")
    MixedPrecision(True, "cpu", "scst")
    MixedPrecision(False, "cpu", "xe")
    err = capsys.readouterr().err
    assert err.count(NOTE) == 1 and err.startswith("xe: ")


# ---- amp: the autocast + GradScaler path ---------------------------------------------------------------

def test_amp_training_is_finite_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    device = amp_device(monkeypatch)
    feats, prep = make_dataset(tmp_path)
    kw = dict(FAST, device=device, keep_resume=True)
    plain = train_xe(feats, prep, tmp_path / "fp32" / "xe.safetensors", "updown", TINY, epochs=1, **kw)
    full, cut = tmp_path / "full" / "xe.safetensors", tmp_path / "cut" / "xe.safetensors"
    ref = train_xe(feats, prep, full, "updown", TINY, epochs=3, amp=True, pin_memory=True, **kw)
    assert NOTE not in capsys.readouterr().err
    losses = [h["loss"] for h in ref["history"]]
    assert all(math.isfinite(x) for x in losses) and losses[0] != plain["history"][0]["loss"]  # low precision ran

    train_xe(feats, prep, cut, "updown", TINY, epochs=1, amp=True, pin_memory=True, **kw)  # "killed" here
    first = load_tensors(run_files(cut)[0])[1]["amp_scaler"]
    res = train_xe(feats, prep, cut, "updown", TINY, epochs=3, amp=True, pin_memory=True, **kw)
    assert "resuming" in capsys.readouterr().err
    resumed = [h["loss"] for h in res["history"]]
    assert resumed == losses if device == "cpu" else resumed == pytest.approx(losses, rel=1e-3)
    assert same_weights(final_weights(full), final_weights(cut), exact=device == "cpu")
    # the scaler continued from its saved state: a fresh one would count only the last 2 epochs' steps
    state_full = load_tensors(run_files(full)[0])[1]["amp_scaler"]
    assert state_full == load_tensors(run_files(cut)[0])[1]["amp_scaler"]
    assert state_full["_growth_tracker"] == 3 * first["_growth_tracker"] > 0
    assert read_decoder_meta(full)["amp"] is True


def test_scaler_state_round_trip_and_bad_state(tmp_path, monkeypatch):
    device = amp_device(monkeypatch)
    mp = MixedPrecision(True, device)
    assert mp.active
    _one_step(mp.scaler, device=device)
    _one_step(mp.scaler, loss_factor=1e38, device=device)  # an overflow: the scale backs off, the tracker resets
    _one_step(mp.scaler, device=device)
    state = mp.state()
    path = tmp_path / "r.safetensors"
    save_tensors(path, {"x": torch.zeros(1)}, {"amp_scaler": state})  # metadata is JSON: plain numbers only
    again = MixedPrecision(True, device)
    again.load_state(load_tensors(path)[1]["amp_scaler"], path)
    assert again.state() == state and state["scale"] == mp.scaler.get_scale() and state["_growth_tracker"] == 1
    with pytest.raises(UserError, match="r.safetensors: unreadable amp scaler state"):
        MixedPrecision(True, device).load_state({"scale": 2.0}, path)
    # inactive: nothing to save, and a saved state is ignored
    off = MixedPrecision(False, device)
    assert off.state() == {} and not off.active
    off.load_state(state, path)
    assert off.state() == {}


def test_pruning_masks_hold_under_amp(tmp_path, monkeypatch):
    device = amp_device(monkeypatch)
    feats, prep = make_dataset(tmp_path)
    ckpt = tmp_path / "xe.safetensors"
    train_xe(feats, prep, ckpt, "updown", TINY, epochs=1, **dict(FAST, device=device))
    out = tmp_path / "pruned.safetensors"
    res = train_xe(feats, prep, out, None, None, epochs=2, init_from=ckpt, pruner=Pruner("global", 0.6),
                   stage="prune", amp=True, log_json=tmp_path / "log.json", **dict(FAST, device=device))
    assert all(math.isfinite(h["loss"]) for h in res["history"])
    assert measured_sparsity(out)["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert read_json(tmp_path / "log.json")["settings"]["amp"] is True
