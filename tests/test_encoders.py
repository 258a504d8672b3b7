"""Encoders: shapes, save/load, weight sources (incl. pickle refusal), pretraining, cached features."""
import json
import pathlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from captioning.encoders import create_encoder, extract_dataset, load_encoder, make_encoder, save_encoder
from captioning.encoders.features import encode_images, extract_features
from captioning.encoders.pretrain import pretrain
from captioning.encoders.weights import init_weights, lite_state_dict
from captioning.errors import UserError
from captioning.io import save_tensors

COCO5 = Path(__file__).parent / "data" / "coco5"


def _images(root: Path, colours) -> list[dict]:
    """Solid squares on grey, one file per colour; returns an images_json list."""
    items = []
    for n, (colour, split) in enumerate(colours):
        im = Image.new("RGB", (40, 40), (128, 128, 128))
        im.paste(Image.new("RGB", (24, 24), colour), (8 + n % 5, 8 + n % 3))
        rel = f"img/{n}.png"
        (root / "img").mkdir(parents=True, exist_ok=True)
        im.save(root / rel)
        items.append({"id": 100 + n, "file_path": rel, "split": split})
    return items


@pytest.mark.parametrize("name,size,grid,dim", [("mobilenetv3_small_100", 64, 4, 576), ("resnet18", 64, 4, 512),
                                                ("vit_tiny_patch16_224", 32, 4, 192)])
def test_shapes(name, size, grid, dim):
    enc = create_encoder(name, img_size=size).eval()
    with torch.no_grad():
        fc, att = enc(torch.randn(2, 3, size, size))
    assert enc.feat_dim == dim
    assert fc.shape == (2, dim) and att.shape == (2, grid, dim)
    torch.testing.assert_close(fc, att.mean(1))


def test_config_defaults_and_unknown_name():
    enc = create_encoder("tf_efficientnet_lite0")
    assert enc.config() == {"timm_name": "tf_efficientnet_lite0", "img_size": 128,
                            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    json.dumps(enc.config())
    with pytest.raises(UserError, match="unknown encoder 'xyz' \\(not a timm model\\)"):
        create_encoder("xyz")
    with pytest.raises(UserError, match="std"):
        create_encoder("resnet18", std=[1, 0, 1])


def test_random_init_is_seeded():
    a, b, c = (create_encoder("resnet18", img_size=32, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.model.conv1.weight, b.model.conv1.weight)
    assert not torch.equal(a.model.conv1.weight, c.model.conv1.weight)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = create_encoder("mobilenetv3_small_100", img_size=64, mean=[0.1, 0.2, 0.3], std=[1, 2, 3]).eval()
    save_encoder(enc, tmp_path / "enc.safetensors")
    back = load_encoder(tmp_path / "enc.safetensors")
    assert not back.training and back.config() == enc.config()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(enc(x), back(x)):
            assert torch.equal(a, b)
    # the saved file is also a weights source for a fresh encoder
    fresh = create_encoder("mobilenetv3_small_100", img_size=64).eval()
    init_weights(fresh, tmp_path / "enc.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x)[1], enc(x)[1])


def test_load_encoder_errors(tmp_path):
    save_tensors(tmp_path / "plain.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(UserError, match="plain.safetensors: not an encoder file"):
        load_encoder(tmp_path / "plain.safetensors")
    enc = create_encoder("resnet18", img_size=32)
    sd = enc.model.state_dict()
    sd.pop("conv1.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_tensors(tmp_path / "bad.safetensors", sd, {"kind": "captioning.encoder", "config": enc.config()})
    with pytest.raises(UserError, match=r"bad.safetensors.*conv1.weight.*extra.weight"):
        load_encoder(tmp_path / "bad.safetensors")


def test_lite0_weights_are_real_imagenet():
    sd = lite_state_dict("efficientnet-lite0")
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    model.load_state_dict(sd, strict=True)
    enc = create_encoder("tf_efficientnet_lite0")
    init_weights(enc, "efficientnet-lite0")  # strict, without the classifier
    assert torch.equal(enc.model.conv_head.weight, sd["conv_head.weight"])
    from captioning.data.images import load_tensor
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 128, 128, generator=gen) * 2 - 1
    if COCO5.is_dir():  # real photos: a restaurant and a bakery counter (ImageNet 762, 415)
        x = torch.stack([load_tensor(COCO5 / "train2014" / f, 128, enc.mean, enc.std) for f in
                         ("COCO_train2014_000000057870.jpg", "COCO_train2014_000000384029.jpg")])
    with torch.no_grad():
        logits = model(x)
    assert torch.isfinite(logits).all() and logits.std() > 0.5
    assert not torch.allclose(logits[0], logits[1], atol=1e-2)
    if COCO5.is_dir():
        assert logits.argmax(-1).tolist() == [762, 415]
    with pytest.raises(UserError, match="tf_efficientnet_lite0"):
        init_weights(create_encoder("resnet18", img_size=32), "efficientnet-lite0")


def test_weights_from_pth_with_wrapper_and_head(tmp_path):
    src = timm.create_model("resnet18", num_classes=1000).eval()  # has an 'fc' classifier
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, tmp_path / "r18.pth")
    enc = create_encoder("resnet18", img_size=32).eval()
    init_weights(enc, tmp_path / "r18.pth")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[1], src.forward_features(x).flatten(2).transpose(1, 2))


class Evil:
    def __reduce__(self):  # unpickling would create the marker file
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickled_object_is_refused_not_loaded(tmp_path):
    evil = Evil()
    evil.marker = str(tmp_path / "pwned")
    torch.save({"conv1.weight": torch.zeros(1), "x": evil}, tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(UserError, match="evil.pth: refused"):
        init_weights(create_encoder("resnet18", img_size=32), tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_mismatched_weights(tmp_path):
    save_tensors(tmp_path / "r18.safetensors", timm.create_model("resnet18").state_dict())
    with pytest.raises(UserError, match=r"r18.safetensors: weights do not fit.*missing \d+"):
        init_weights(create_encoder("mobilenetv3_small_100", img_size=32), tmp_path / "r18.safetensors")
    torch.save(timm.create_model("mobilenetv3_small_075").state_dict(), tmp_path / "s075.pt")
    with pytest.raises(UserError, match="s075.pt: .*wrong shape"):
        init_weights(create_encoder("mobilenetv3_small_100", img_size=32), tmp_path / "s075.pt")
    with pytest.raises(UserError, match="not found"):
        init_weights(create_encoder("resnet18", img_size=32), tmp_path / "missing.safetensors")


def _objects_dataset(root: Path) -> None:
    """Red and blue squares labelled by colour: images.json, objects.json and info.json in ``root``."""
    red, blue = (220, 20, 20), (20, 20, 220)
    colours = [(red if n % 2 else blue, "train") for n in range(16)] + [(red, "val"), (blue, "val")]
    items = _images(root, colours)
    (root / "images.json").write_text(json.dumps(items))
    objects = {"label_names": ["red", "blue"],
               "images": [{"cocoid": it["id"], "labels": [0 if c == red else 1]} for it, (c, _) in zip(items, colours)]}
    (root / "objects.json").write_text(json.dumps(objects))
    (root / "info.json").write_text(json.dumps({"image_root": str(root)}))


def test_pretrain_reduces_loss(tmp_path):
    _objects_dataset(tmp_path)
    enc = create_encoder("resnet18", img_size=32)
    hist = pretrain(enc, tmp_path / "objects.json", tmp_path / "images.json", tmp_path,
                    epochs=4, batch_size=8, lr=1e-3, seed=0, device="cpu")
    losses = [e["loss"] for e in hist["epochs"]]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    assert all(0.0 <= e["val_f1"] <= 1.0 for e in hist["epochs"])
    assert not enc.training
    again = pretrain(create_encoder("resnet18", img_size=32), tmp_path / "objects.json", tmp_path / "images.json",
                     tmp_path, epochs=1, batch_size=8, lr=1e-3, seed=0, device="cpu")
    assert again["epochs"][0] == hist["epochs"][0]  # same seed, same numbers
    (tmp_path / "objects.json").write_text(json.dumps({"label_names": ["a"], "images": [{"cocoid": 1, "labels": [3]}]}))
    with pytest.raises(UserError, match="objects.json"):
        pretrain(enc, tmp_path / "objects.json", tmp_path / "images.json", tmp_path, epochs=1)


def test_pretrain_patience_stops_at_the_plateau_and_keeps_the_best_epoch(tmp_path, monkeypatch):
    import captioning.encoders.pretrain as pretraining

    _objects_dataset(tmp_path)
    script, states, sizes = iter([0.2, 0.5, 0.4, 0.45, 0.9]), [], []
    real_load = pretraining._load_split

    def scripted_f1(encoder, head, x, y, batch_size, device):  # validation F1 rises, then stalls
        states.append({k: v.clone() for k, v in encoder.state_dict().items()})
        return next(script)

    def recording_load(items, root, size, labels, n_labels):
        sizes.append(size)
        return real_load(items, root, size, labels, n_labels)

    monkeypatch.setattr(pretraining, "_evaluate", scripted_f1)
    monkeypatch.setattr(pretraining, "_load_split", recording_load)
    enc = create_encoder("resnet18", img_size=32)
    hist = pretrain(enc, tmp_path / "objects.json", tmp_path / "images.json", tmp_path, epochs=5, batch_size=8,
                    seed=0, device="cpu", patience=2, img_size=48)
    # epochs 3 and 4 did not beat epoch 2: stop there (epoch 5's 0.9 is never reached), keep epoch 2
    assert [e["val_f1"] for e in hist["epochs"]] == [0.2, 0.5, 0.4, 0.45] and hist["best_epoch"] == 2
    assert all(torch.equal(v, states[1][k]) for k, v in enc.state_dict().items())
    assert not all(torch.equal(v, states[3][k]) for k, v in enc.state_dict().items())
    assert sizes == [48, 48] and enc.img_size == 32  # pretrained at 48 px; the encoder keeps its own size


def test_pretrain_settings_it_cannot_honour_are_user_errors(tmp_path):
    _objects_dataset(tmp_path)
    vit = create_encoder("vit_tiny_patch16_224", img_size=32)
    with pytest.raises(UserError, match="pretrain.img_size 48: vit_tiny_patch16_224 takes only its own size 32"):
        pretrain(vit, tmp_path / "objects.json", tmp_path / "images.json", tmp_path, img_size=48, device="cpu")
    items = [it for it in json.loads((tmp_path / "images.json").read_text()) if it["split"] != "val"]
    (tmp_path / "images.json").write_text(json.dumps(items))
    with pytest.raises(UserError, match="pretrain.patience needs validation F1"):
        pretrain(create_encoder("resnet18", img_size=32), tmp_path / "objects.json", tmp_path / "images.json",
                 tmp_path, patience=1, device="cpu")


def test_extract_features_matches_encode_images(tmp_path):
    items = _images(tmp_path, [((200, 30 * n, 10), "train") for n in range(5)])
    (tmp_path / "images.json").write_text(json.dumps(items))
    enc = create_encoder("mobilenetv3_small_100", img_size=64)
    out = tmp_path / "feats" / "mnv3.h5"
    extract_features(enc, tmp_path / "images.json", tmp_path, out, batch_size=2, device="cpu")
    assert [p.name for p in out.parent.iterdir()] == ["mnv3.h5"]  # no temporary left behind
    with h5py.File(out) as f:
        assert f["ids"].dtype == np.int64 and f["ids"][:].tolist() == [100, 101, 102, 103, 104]
        assert f["fc"].dtype == np.float16 and f["fc"].shape == (5, 576)
        assert f["att"].dtype == np.float16 and f["att"].shape == (5, 4, 576)
        assert dict(f.attrs) == {"timm_name": "mobilenetv3_small_100", "img_size": 64, "feat_dim": 576}
        assert not np.allclose(f["fc"][0], f["fc"][3])  # each row is its own image
        fc_h5, att_h5 = torch.from_numpy(f["fc"][3]).float(), torch.from_numpy(f["att"][3]).float()
    fc, att = encode_images(enc, [tmp_path / items[3]["file_path"]], device="cpu")
    torch.testing.assert_close(fc_h5, fc[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(att_h5, att[0], rtol=2e-3, atol=2e-3)
    with pytest.raises(UserError, match="image folder not found"):
        extract_features(enc, tmp_path / "images.json", tmp_path / "nope", out)


def test_make_encoder_weight_sources(tmp_path):
    """One call per source; with ``out`` it saves the encoder and logs {"weights", "history"}."""
    x = torch.randn(1, 3, 32, 32)
    random, history = make_encoder("resnet18", 32, "random", seed=5)
    assert history == {} and torch.equal(random.model.conv1.weight, create_encoder("resnet18", 32).model.conv1.weight)
    save_encoder(random, tmp_path / "r18.safetensors")
    from_file, _ = make_encoder("resnet18", 32, str(tmp_path / "r18.safetensors"), out=tmp_path / "copy.safetensors",
                                log_json=tmp_path / "log.json")
    with torch.no_grad():
        assert torch.equal(load_encoder(tmp_path / "copy.safetensors").eval()(x)[0], random.eval()(x)[0])
    assert json.loads((tmp_path / "log.json").read_text()) == {"weights": str(tmp_path / "r18.safetensors"),
                                                               "history": {}}
    with pytest.raises(UserError, match="needs objects.json"):
        make_encoder("resnet18", 32, "pretrain", prepared=tmp_path)
    _objects_dataset(tmp_path)
    settings = {"epochs": 1, "batch_size": 8}
    enc, history = make_encoder("resnet18", 32, "pretrain", objects=tmp_path / "objects.json", prepared=tmp_path,
                                pretrain=settings, device="cpu")
    direct = pretrain(create_encoder("resnet18", 32), tmp_path / "objects.json", tmp_path / "images.json", tmp_path,
                      device="cpu", **settings)
    assert history == direct


def test_extract_dataset_reads_the_prepared_directory(tmp_path):
    items = _images(tmp_path, [((200, 30 * n, 10), "train") for n in range(3)])
    (tmp_path / "images.json").write_text(json.dumps(items))
    (tmp_path / "info.json").write_text(json.dumps({"image_root": str(tmp_path)}))
    enc = create_encoder("mobilenetv3_small_100", img_size=32)
    save_encoder(enc, tmp_path / "enc.safetensors")
    extract_dataset(tmp_path / "enc.safetensors", tmp_path, tmp_path / "a.h5", batch_size=2, device="cpu")
    extract_features(enc, tmp_path / "images.json", tmp_path, tmp_path / "b.h5", batch_size=2, device="cpu")
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert all(np.array_equal(a[k][:], b[k][:]) for k in ("ids", "fc", "att"))
