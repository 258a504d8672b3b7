"""Magnitude pruning (global, layer-wise, LAMP, gradual) and fine-tuning with the masks held, on tiny decoders."""
import pytest
import torch

from captioning.compress.prune import PRUNE_METHODS, Pruner, lamp_scores, make_masks, measured_sparsity, prunable
from captioning.errors import UserError
from captioning.io import load_tensors
from captioning.models import create_decoder, load_decoder, read_decoder_meta, save_decoder
from captioning.training import finetune_pruned, train_xe
from helpers import TINY, make_dataset

FT = dict(batch_size=3, seed=2, progress=False)


def tiny_decoder(seed=0, **cfg):
    torch.manual_seed(seed)
    return create_decoder("updown", 10, 6, **{**TINY, "rnn_size": 24, **cfg})


def pruned_fraction(masks):
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained tiny Up-Down checkpoint and its data, shared by the fine-tuning tests."""
    root = tmp_path_factory.mktemp("base")
    feats, prep = make_dataset(root)
    ckpt = root / "xe.safetensors"
    train_xe(feats, prep, ckpt, "updown", TINY, epochs=2, lr=1e-2, **FT)
    return feats, prep, ckpt


# ---- masks --------------------------------------------------------------------------------------

def test_prunable_is_every_matrix_and_no_bias():
    m = tiny_decoder()
    assert set(prunable(m)) == {
        "embed.weight", "fc_embed.weight", "att_embed.weight", "ctx2att.weight", "logit.weight",
        "core.att_lstm.weight_ih", "core.att_lstm.weight_hh", "core.lang_lstm.weight_ih",
        "core.lang_lstm.weight_hh", "core.attention.h2att.weight", "core.attention.alpha_net.weight"}
    assert set(PRUNE_METHODS) == {"global", "layerwise", "gradual", "lamp", "gradual_lamp"}


@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize("method", ["global", "layerwise", "lamp"])
def test_masks_reach_the_ratio(method, ratio):
    m = tiny_decoder()
    masks = make_masks(m, method, ratio)
    params = prunable(m)
    assert masks.keys() == params.keys()
    assert all(masks[n].dtype == torch.bool and masks[n].shape == p.shape for n, p in params.items())
    assert pruned_fraction(masks) == pytest.approx(ratio, abs=0.005)
    per_tensor = {n: 1 - mk.float().mean().item() for n, mk in masks.items()}
    if method == "layerwise":  # every tensor gets the ratio, up to rounding one weight
        assert all(abs(int((~mk).sum()) - ratio * mk.numel()) <= 0.5 for mk in masks.values())
    elif method == "global":  # layers differ (the embedding's N(0, 1) weights are larger than the Linear ones)
        assert per_tensor["embed.weight"] < ratio - 0.1
        assert max(per_tensor.values()) - min(per_tensor.values()) > 0.2
    else:  # lamp: layers differ too, but every tensor keeps some weights
        assert max(per_tensor.values()) - min(per_tensor.values()) > 0.05
        assert all(mk.any() for mk in masks.values())
    assert all(torch.equal(masks[n], mk) for n, mk in make_masks(m, method, ratio).items())  # deterministic


def test_global_prunes_the_smallest_magnitudes():
    m = tiny_decoder()
    masks = make_masks(m, "global", 0.7)
    w = torch.cat([p.detach().abs().flatten() for p in prunable(m).values()])
    keep = torch.cat([mk.flatten() for mk in masks.values()])
    assert w[keep].min() >= w[~keep].max()


def test_lamp_scores_follow_their_definition():
    w = torch.tensor([[0.5, -2.0, 0.0], [1.0, -0.5, 3.0]])
    sq = w.flatten() ** 2
    # the definition, entry by entry: w_u^2 over the sum of w_v^2 ranked at or above u (ties by position)
    rank = sorted(range(6), key=lambda i: (sq[i].item(), i))
    want = torch.empty(6, dtype=torch.float64)
    for r, i in enumerate(rank):
        want[i] = sq[i] / sum(sq[j] for j in rank[r:])
    got = lamp_scores(w)
    assert torch.allclose(got, want) and got.max() == 1.0 and got[2] == 0.0
    assert got[0] < got[4]  # the two equal magnitudes: the later position ranks higher, as ties are broken


def test_lamp_does_not_empty_a_layer_of_small_weights():
    """Global magnitude empties a tensor whose weights are all small; LAMP keeps its largest ones."""
    m = tiny_decoder()
    with torch.no_grad():
        m.att_embed.weight.mul_(1e-3)
    dropped = lambda masks, n: 1 - masks[n].float().mean().item()  # noqa: E731
    assert dropped(make_masks(m, "global", 0.8), "att_embed.weight") == 1.0
    lamp = make_masks(m, "lamp", 0.8)
    assert dropped(lamp, "att_embed.weight") < 0.95 and pruned_fraction(lamp) == pytest.approx(0.8, abs=0.005)
    for n, p in prunable(m).items():  # within each tensor, still the largest magnitudes are kept
        w, keep = p.detach().abs(), lamp[n]
        if keep.any() and (~keep).any():
            assert w[keep].min() >= w[~keep].max(), n


@pytest.mark.parametrize("name, cfg", [
    ("aoanet", dict(input_encoding_size=16, rnn_size=16, att_hid_size=16, num_heads=2, refiner_layers=1)),
    ("transformer", dict(d_model=16, d_ff=32, num_heads=2, enc_layers=1, dec_layers=1, tie_embeddings=True)),
])
def test_other_decoders_prune_the_same_way(name, cfg):
    torch.manual_seed(0)
    m = create_decoder(name, 10, 6, **cfg)
    names = set(prunable(m))
    assert "embed.weight" in names and not any(n.endswith("bias") for n in names)
    assert {n for n, p in m.named_parameters() if p.dim() == 1}.isdisjoint(names)  # norms, biases stay dense
    Pruner("global", 0.7).on_epoch_start(m, 0)
    assert measured_sparsity(m)["sparsity"] == pytest.approx(0.7, abs=0.005)
    assert measured_sparsity(m.state_dict()) == measured_sparsity(m)


def test_ties_are_broken_by_position_and_the_count_is_exact():
    m = tiny_decoder()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.25)  # every magnitude ties
    masks = make_masks(m, "global", 0.5)
    keep = torch.cat([mk.flatten() for mk in masks.values()])
    k = round(0.5 * keep.numel())
    assert int((~keep).sum()) == k and not keep[:k].any() and keep[k:].all()


def reference_masks(m, method, ratio, previous):
    """The definition, over every entry: pruned ones score -1, then one threshold (per tensor for layerwise)."""
    params = prunable(m)
    score = lamp_scores if method == "lamp" else (lambda w: w.detach().abs().flatten().double())
    scores = {n: score(p).masked_fill(~previous[n].flatten(), -1.0) for n, p in params.items()}
    groups = [[n] for n in params] if method == "layerwise" else [list(params)]
    out = {}
    for names in groups:
        flat = torch.cat([scores[n] for n in names])
        k = max(round(ratio * flat.numel()), int((flat < 0).sum()))
        rank = sorted(range(flat.numel()), key=lambda i: (flat[i].item(), i))  # ties: earlier position first
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[rank[:k]] = False
        out.update(zip(names, (mk.view_as(params[n]) for mk, n in zip(keep.split([params[n].numel() for n in names]), names))))
    return out


@pytest.mark.parametrize("method", ["global", "layerwise", "lamp"])
def test_masks_from_earlier_ones_search_only_the_kept_weights_and_match_the_definition(method):
    """As in training: the pruned weights are zero, the kept ones have moved, and some magnitudes tie."""
    m = tiny_decoder()
    previous = make_masks(m, method, 0.4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in prunable(m).items():
            p.add_(0.05 * torch.randn(p.shape, generator=gen)).mul_(previous[n])
            p.view(-1)[::7] = p.view(-1)[::7].sign() * 0.03  # ties at a magnitude near the threshold
    for ratio in (0.4, 0.55, 0.8):
        masks = make_masks(m, method, ratio, previous=previous)
        want = reference_masks(m, method, ratio, previous)
        assert all(torch.equal(masks[n], want[n]) for n in want), ratio
        assert all((~previous[n] <= ~masks[n]).all() for n in masks)


@pytest.mark.parametrize("method", ["gradual", "gradual_lamp"])
def test_masks_only_grow_under_the_gradual_schedule(method):
    m = tiny_decoder()
    pr = Pruner(method, 0.9, epochs=4)
    ratios = [pr.ratio_at(e) for e in range(4)]
    assert ratios == sorted(ratios) and ratios[0] > 0 and ratios[-1] == 0.9 and pr.ratio_at(9) == 0.9
    assert [pr.at_target(e) for e in range(5)] == [False, False, False, True, True]
    prev = None
    gen = torch.Generator().manual_seed(0)
    for e in range(4):
        pr.on_epoch_start(m, e)
        assert pruned_fraction(pr.masks) == pytest.approx(ratios[e], abs=0.005)
        assert measured_sparsity(m)["sparsity"] == pytest.approx(ratios[e], abs=0.005)
        if prev is not None:
            assert all((~prev[n] <= ~pr.masks[n]).all() for n in prev)  # once pruned, always pruned
        prev = {n: mk.clone() for n, mk in pr.masks.items()}
        with torch.no_grad():  # updates that revive pruned weights and reorder magnitudes
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
    # one-shot methods ignore the epoch
    fixed = Pruner("layerwise", 0.5, epochs=3)
    assert fixed.ratio_at(0) == 0.5 and fixed.at_target(0) and "schedule_epochs" not in fixed.describe()


def test_hooks_zero_weights_and_grads():
    m = tiny_decoder()
    pr = Pruner("global", 0.8)
    pr.on_epoch_start(m, 0)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    pr.before_step(m)
    for n, p in prunable(m).items():
        assert (p[~pr.masks[n]] == 0).all() and (p.grad[~pr.masks[n]] == 0).all()
        assert (p.grad[pr.masks[n]] == 1).all()
    assert (m.logit.bias.grad == 1).all()  # biases are not pruned


def test_masks_survive_a_restart_even_where_weights_cannot_tell():
    m = tiny_decoder()
    pr = Pruner("layerwise", 0.5)
    pr.on_epoch_start(m, 0)
    with torch.no_grad():
        m.logit.weight[pr.masks["logit.weight"]] = 0.0  # kept weights that happen to reach 0
    resumed = Pruner("layerwise", 0.5)
    resumed.load_state_tensors(pr.state_tensors(), m)
    resumed.on_epoch_start(m, 1)
    assert all(torch.equal(resumed.masks[n], pr.masks[n]) for n in pr.masks)
    fresh = Pruner("layerwise", 0.5)  # re-derived from the zero pattern, it would guess wrong here
    fresh.on_epoch_start(m, 1)
    assert not torch.equal(fresh.masks["logit.weight"], pr.masks["logit.weight"])
    with pytest.raises(UserError, match="masks do not match"):
        Pruner("global", 0.5).load_state_tensors(pr.state_tensors(), tiny_decoder(rnn_size=8))


def test_measured_sparsity_from_decoder_state_and_file(tmp_path):
    m = tiny_decoder()
    with torch.no_grad():
        m.logit.weight.zero_()
        m.logit.bias.zero_()
    n_big = sum(p.numel() for p in prunable(m).values())
    s = measured_sparsity(m)
    assert s["sparsity"] == pytest.approx(m.logit.weight.numel() / n_big)
    assert s["sparsity_all"] == pytest.approx((m.logit.weight.numel() + m.logit.bias.numel()) / m.num_parameters())
    save_decoder(m, tmp_path / "d.safetensors")
    assert measured_sparsity(m.state_dict()) == s == measured_sparsity(tmp_path / "d.safetensors")


def test_user_errors():
    m = tiny_decoder()
    with pytest.raises(UserError, match="unknown pruning method 'random'"):
        make_masks(m, "random", 0.5)
    for bad in (1.0, -0.1, "lots"):
        with pytest.raises(UserError, match="pruning ratio"):
            Pruner("global", bad)
    with pytest.raises(UserError, match="epoch"):
        Pruner("gradual", 0.5, epochs=0)


# ---- fine-tuning ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["global", "layerwise", "lamp"])
def test_finetune_keeps_pruned_weights_at_zero(base, tmp_path, method):
    feats, prep, ckpt = base
    before = load_decoder(ckpt)
    expected = make_masks(before, method, 0.9)  # what pruning the checkpoint must choose
    out = tmp_path / "pruned.safetensors"
    res = finetune_pruned(ckpt, feats, prep, out, method, 0.9, epochs=2, lr=1e-2, **FT)
    meta = read_decoder_meta(out)
    assert meta["stage"] == "prune" and meta["prune_method"] == method and meta["prune_ratio"] == 0.9
    assert meta["sparsity"] == pytest.approx(0.9, abs=0.005) and 0 < meta["sparsity_all"] < meta["sparsity"]
    assert meta["epoch"] == res["best_epoch"] and meta["init_from"]["path"] == str(ckpt)
    after = load_decoder(out)
    assert after.config == before.config
    weights = dict(after.named_parameters())
    old = dict(before.named_parameters())
    for n, keep in expected.items():
        assert (weights[n][~keep] == 0).all(), n  # Adam did not revive any pruned weight
    kept = expected["logit.weight"]
    assert not torch.equal(weights["logit.weight"][kept], old["logit.weight"][kept])  # it did fine-tune
    assert [h["sparsity"] for h in res["history"]] == pytest.approx([0.9, 0.9], abs=0.005)
    assert res["settings"]["pruner"] == {"method": method, "scope": method, "ratio": 0.9}


def test_gradual_keeps_a_checkpoint_at_the_target(base, tmp_path):
    feats, prep, ckpt = base
    out = tmp_path / "gradual.safetensors"
    res = finetune_pruned(ckpt, feats, prep, out, "gradual", 0.8, epochs=3, lr=1e-2, **FT)
    sp = [h["sparsity"] for h in res["history"]]
    assert sp == sorted(sp) and sp[0] < 0.6 and sp[-1] == pytest.approx(0.8, abs=0.005)
    meta = read_decoder_meta(out)
    assert res["best_epoch"] == meta["epoch"] == 3  # the only epoch at the final sparsity
    assert meta["sparsity"] == pytest.approx(0.8, abs=0.005) and meta["prune_method"] == "gradual"


def test_finetune_distils_from_the_unpruned_decoder_with_masks_held(base, tmp_path):
    feats, prep, ckpt = base
    out = tmp_path / "kd.safetensors"
    res = finetune_pruned(ckpt, feats, prep, out, "global", 0.8, epochs=2, lr=1e-2, kd_weight=0.5,
                          kd_temperature=2.0, **FT)
    # the teacher is the checkpoint just pruned, read over the student's own features
    assert res["settings"]["kd"]["teacher_sha256"] == res["settings"]["init_from"]["sha256"]
    assert res["settings"]["kd"]["kd_weight"] == 0.5 and res["settings"]["kd"]["kd_temperature"] == 2.0
    assert all(h["kd_loss"] > 0 for h in res["history"])  # the pruned student differs from its dense self
    meta = read_decoder_meta(out)
    assert meta["teacher"]["path"] == str(ckpt) and meta["sparsity"] == pytest.approx(0.8, abs=0.005)
    masks = make_masks(load_decoder(ckpt), "global", 0.8)
    weights = dict(load_decoder(out).named_parameters())
    assert all((weights[n][~keep] == 0).all() for n, keep in masks.items())
    # without kd_weight nothing of this enters the run
    plain = finetune_pruned(ckpt, feats, prep, tmp_path / "plain.safetensors", "global", 0.8, epochs=1,
                            lr=1e-2, **FT)
    assert "kd" not in plain["settings"] and "kd_loss" not in plain["history"][0]
    # sequence-level: the dense decoder's own beam captions are the extra targets, masks still held
    seq = finetune_pruned(ckpt, feats, prep, tmp_path / "seq.safetensors", "global", 0.8, epochs=1, lr=1e-2,
                          kd_weight=0.5, kd_mode="sequence", **FT)
    assert seq["settings"]["kd"]["kd_mode"] == "sequence" and seq["history"][0]["kd_loss"] > 0
    weights = dict(load_decoder(tmp_path / "seq.safetensors").named_parameters())
    assert all((weights[n][~keep] == 0).all() for n, keep in masks.items())


def test_finetune_distils_from_another_teacher_with_kd_teacher_scst(base, tmp_path):
    """kd_teacher scst: the given checkpoint (the decoder after SCST) teaches, not the one pruned; masks held."""
    feats, prep, ckpt = base
    teacher = tmp_path / "scst.safetensors"
    train_xe(feats, prep, teacher, "updown", TINY, epochs=1, lr=1e-2, init_from=ckpt, **FT)  # another decoder
    res = finetune_pruned(ckpt, feats, prep, tmp_path / "kd.safetensors", "global", 0.8, epochs=1, lr=1e-2,
                          kd_weight=0.5, kd_mode="sequence", kd_teacher="scst", teacher=teacher, **FT)
    kd = res["settings"]["kd"]
    assert kd["teacher_sha256"] != res["settings"]["init_from"]["sha256"] and kd["kd_mode"] == "sequence"
    assert read_decoder_meta(tmp_path / "kd.safetensors")["teacher"]["path"] == str(teacher)
    masks = make_masks(load_decoder(ckpt), "global", 0.8)
    weights = dict(load_decoder(tmp_path / "kd.safetensors").named_parameters())
    assert all((weights[n][~keep] == 0).all() for n, keep in masks.items())
    # the control (ratio 0) takes the same teacher
    control = finetune_pruned(ckpt, feats, prep, tmp_path / "c.safetensors", "global", 0.0, epochs=1, lr=1e-2,
                              kd_weight=0.5, kd_mode="sequence", kd_teacher="scst", teacher=teacher, **FT)
    assert control["settings"]["kd"]["teacher_sha256"] == kd["teacher_sha256"]
    for bad, match in ((dict(kd_teacher="scst"), "needs the SCST decoder"), (dict(teacher=teacher), "only"),
                       (dict(kd_teacher="scst", teacher=teacher, kd_weight=0.0), "only"),
                       (dict(kd_teacher="dense"), "kd_teacher must be")):
        with pytest.raises(UserError, match=match):
            finetune_pruned(ckpt, feats, prep, tmp_path / "x.safetensors", "global", 0.8, epochs=1,
                            **{"kd_weight": 0.5, **bad}, **FT)


def test_gradual_with_a_shorter_schedule_recovers_at_the_target(base, tmp_path):
    feats, prep, ckpt = base
    res = finetune_pruned(ckpt, feats, prep, tmp_path / "g.safetensors", "gradual", 0.8, epochs=4, lr=1e-2,
                          schedule_epochs=2, **FT)
    sp = [h["sparsity"] for h in res["history"]]
    assert sp[0] < 0.75 and sp[1:] == pytest.approx([0.8] * 3, abs=0.005)  # at the target from epoch 2 on
    vals = [h["val_cider"] for h in res["history"]]
    assert res["best_epoch"] in (2, 3, 4) and res["best_val_cider"] == max(vals[1:])  # the best of epochs 2-4
    assert res["settings"]["pruner"]["schedule_epochs"] == 2


def test_ratio_zero_changes_nothing_structurally(base, tmp_path):
    feats, prep, ckpt = base
    out = tmp_path / "p0.safetensors"
    finetune_pruned(ckpt, feats, prep, out, "global", 0.0, epochs=1, lr=1e-3, **FT)
    a, b = load_tensors(ckpt)[0], load_tensors(out)[0]
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert read_decoder_meta(out)["config"] == read_decoder_meta(ckpt)["config"]
    assert read_decoder_meta(out)["sparsity"] == measured_sparsity(a)["sparsity"] == 0.0
    assert read_decoder_meta(out)["stage"] == "control"  # ratio 0: the sweep's dense control


def test_resumed_finetune_equals_uninterrupted(base, tmp_path):
    feats, prep, ckpt = base
    kw = dict(FT, lr=1e-2, keep_resume=True, init_from=ckpt, stage="prune")
    a, b = tmp_path / "a" / "p.safetensors", tmp_path / "b" / "p.safetensors"
    ra = train_xe(feats, prep, a, None, None, epochs=3, pruner=Pruner("gradual", 0.8, 3), **kw)
    r1 = train_xe(feats, prep, b, None, None, epochs=1, pruner=Pruner("gradual", 0.8, 3), **kw)  # "killed"
    assert r1["best_epoch"] == 0 and not b.exists()  # epoch 1 is below the target: nothing kept yet
    rb = train_xe(feats, prep, b, None, None, epochs=3, pruner=Pruner("gradual", 0.8, 3), **kw)
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
    for x, y in ((a, b), (str(a) + ".resume.safetensors", str(b) + ".resume.safetensors")):
        ta, tb = load_tensors(x)[0], load_tensors(y)[0]
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(k.startswith("pruner.mask.") for k in load_tensors(str(b) + ".resume.safetensors")[0])
    # another ratio is other settings: the resume file is not trusted
    rc = train_xe(feats, prep, b, None, None, epochs=3, pruner=Pruner("gradual", 0.5, 3), **kw)
    assert rc["history"][0]["sparsity"] < ra["history"][0]["sparsity"]


def test_init_from_conflicts_are_user_errors(base, tmp_path):
    feats, prep, ckpt = base
    out = tmp_path / "x.safetensors"
    with pytest.raises(UserError, match="rnn_size is 16 in the checkpoint, 32 was asked"):
        train_xe(feats, prep, out, "updown", {"rnn_size": 32}, epochs=1, init_from=ckpt, **FT)
    with pytest.raises(UserError, match="holds a 'updown' decoder, not 'aoanet'"):
        train_xe(feats, prep, out, "aoanet", None, epochs=1, init_from=ckpt, **FT)
    with pytest.raises(UserError, match="no decoder name"):
        train_xe(feats, prep, out, None, None, epochs=1, **FT)
    with pytest.raises(UserError, match="nope.safetensors: file not found"):
        finetune_pruned(tmp_path / "nope.safetensors", feats, prep, out, "global", 0.5, **FT)
    other = tmp_path / "other.safetensors"
    save_decoder(create_decoder("updown", 10, 7, **TINY), other)
    with pytest.raises(UserError, match="feat_dim 7, the training data 6"):
        finetune_pruned(other, feats, prep, out, "global", 0.5, **FT)


def test_gradual_rises_step_by_step_within_one_epoch():
    m = tiny_decoder()
    pr = Pruner("gradual", 0.9, epochs=1)
    pr.on_epoch_start(m, 0, steps=4)
    seen = [pruned_fraction(pr.masks)]
    for step in range(1, 4):
        pr.on_step(m, 0, step, 4)
        seen.append(pruned_fraction(pr.masks))
    expected = [0.9 * (1 - (1 - k / 4) ** 3) for k in range(1, 5)]
    assert seen == pytest.approx(expected, abs=0.005) and seen == sorted(seen) and seen[0] < 0.9
    assert measured_sparsity(m)["sparsity"] == pytest.approx(0.9, abs=0.005)
    one_shot = Pruner("global", 0.9)
    one_shot.on_epoch_start(m, 0, steps=4)
    one_shot.on_step(m, 0, 1, 4)  # a no-op for fixed methods
    assert pruned_fraction(one_shot.masks) == pytest.approx(0.9, abs=0.005)


@pytest.mark.parametrize("method", ["gradual_lamp", "layerwise"])
def test_masks_are_not_searched_again_at_the_same_ratio(method, monkeypatch):
    """After the schedule reaches its ratio (or for a one-shot method, after the first search) no
    mask search runs, and what one would return is the masks held."""
    import captioning.compress.prune as prune_mod

    m, calls = tiny_decoder(), []
    real = prune_mod.make_masks
    monkeypatch.setattr(prune_mod, "make_masks", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    pr = Pruner(method, 0.8, epochs=2)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(4):
        pr.on_epoch_start(m, epoch, steps=3)
        for step in range(3):
            pr.on_step(m, epoch, step, 3)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
            pr.after_step(m)
    assert calls and calls[-1] == 0.8 and calls.count(0.8) == 1
    assert len(calls) == (6 if method == "gradual_lamp" else 1)  # 2 schedule epochs of 3 steps; one-shot: once
    again = real(m, method, 0.8, previous=pr.masks)
    assert all(torch.equal(again[n], pr.masks[n]) for n in again)


def test_every_place_that_names_the_methods_names_them_all():
    """The CLI, the config schema and the rules' wildcard list the methods without importing torch."""
    import re
    from pathlib import Path

    from captioning.cli import build_parser
    from captioning.config import load_schema

    root = Path(__file__).resolve().parents[1]
    prune_cli = build_parser()._subparsers._group_actions[0].choices["prune"]
    cli = next(a.choices for a in prune_cli._actions if a.dest == "method")
    prune_schema = load_schema(root / "workflow/schemas/config.schema.yaml")["properties"]["compress"]["properties"]["prune"]
    schema = prune_schema["properties"]["method"]["enum"]
    compare = prune_schema["properties"]["compare_methods"]["items"]["enum"]
    wildcard = re.search(r'method="([^"]+)"', (root / "workflow/rules/common.smk").read_text()).group(1).split("|")
    for names in (cli, schema, compare, wildcard):
        assert sorted(names) == sorted(PRUNE_METHODS)
