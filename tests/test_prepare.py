"""Caption preparation on 5 real COCO images, plus every way a dataset file can be broken."""
import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from captioning.data.karpathy import image_id, image_path, load_karpathy
from captioning.data.prepare import decode, load_vocab, prepare
from captioning.errors import UserError

COCO5 = Path(__file__).parent / "data" / "coco5"
DATASET = COCO5 / "dataset_coco_testing.json"


def _read(d: Path):
    with h5py.File(d / "labels.h5") as f:
        h5 = {k: f[k][()] for k in f}
    images = json.loads((d / "images.json").read_text())
    return h5, images, load_vocab(d)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    prepare(DATASET, COCO5, out, word_count_threshold=0, max_length=16)
    return out


def test_restval_goes_to_train_and_info(prepared):
    h5, images, itow = _read(prepared)
    by_id = {im["id"]: im for im in images}
    assert by_id[522418]["split"] == "train"  # restval in the source file
    assert [im["id"] for im in images] == [391895, 522418, 184613, 57870, 384029]
    assert all((COCO5 / im["file_path"]).is_file() for im in images)
    info = json.loads((prepared / "info.json").read_text())
    assert info["n_images"] == {"train": 3, "val": 1, "test": 1}
    assert info["vocab_size"] == len(itow) and info["dataset"] == "coco"
    assert Path(info["image_root"]).is_absolute() and Path(info["image_root"]) == COCO5.resolve()
    vocab = json.loads((prepared / "vocab.json").read_text())
    assert vocab["word_count_threshold"] == 0 and vocab["max_length"] == 16
    assert sorted(itow) == list(range(1, len(itow) + 1))


def test_labels_round_trip(prepared):
    h5, images, itow = _read(prepared)
    data = load_karpathy(DATASET)
    assert h5["labels"].dtype == np.int32 and h5["labels"].shape == (25, 16)
    assert h5["label_start_ix"].dtype == np.int64 and h5["label_end_ix"].dtype == np.int64
    assert h5["label_length"].dtype == np.int32
    assert list(h5["label_start_ix"]) == [0, 5, 10, 15, 20] and list(h5["label_end_ix"]) == [5, 10, 15, 20, 25]
    train_words = {t for im in data["images"] if im["split"] in ("train", "restval")
                   for s in im["sentences"] for t in s["tokens"]}
    assert set(itow.values()) == train_words | {"UNK"}  # val/test words are never in the vocabulary
    for i, im in enumerate(data["images"]):
        for k, s in zip(range(h5["label_start_ix"][i], h5["label_end_ix"][i]), im["sentences"]):
            toks = s["tokens"][:16]
            want = toks if im["split"] in ("train", "restval") else [t if t in train_words else "UNK" for t in toks]
            assert decode(itow, h5["labels"][k]) == " ".join(want)
            assert h5["label_length"][k] == len(toks)
            assert not h5["labels"][k, len(toks):].any()


def test_refs_are_coco_caption_files(prepared):
    from pycocotools.coco import COCO

    data = load_karpathy(DATASET)
    for split, want_id in (("val", 184613), ("test", 391895)):
        raw = json.loads((prepared / f"refs_{split}.json").read_text())
        assert raw["type"] == "captions" and raw["info"] == {} and raw["licenses"] == []
        coco = COCO(str(prepared / f"refs_{split}.json"))
        assert coco.getImgIds() == [want_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[want_id]))
        src = next(im for im in data["images"] if image_id(im) == want_id)
        assert [a["caption"] for a in anns] == [s["raw"].strip() for s in src["sentences"]]
        assert len({a["id"] for a in anns}) == 5


def test_truncation(tmp_path):
    prepare(DATASET, COCO5, tmp_path, word_count_threshold=0, max_length=5)
    h5, images, itow = _read(tmp_path)
    data = load_karpathy(DATASET)
    assert h5["labels"].shape == (25, 5) and h5["label_length"].max() == 5
    first = data["images"][3]["sentences"][0]["tokens"]  # a train image: no UNK
    assert len(first) > 5 and decode(itow, h5["labels"][15]) == " ".join(first[:5])
    assert json.loads((tmp_path / "vocab.json").read_text())["max_length"] == 5


def test_unk_threshold(tmp_path):
    prepare(DATASET, COCO5, tmp_path, word_count_threshold=2)
    h5, images, itow = _read(tmp_path)
    data = load_karpathy(DATASET)
    counts = Counter(t for im in data["images"] if im["split"] in ("train", "restval")
                     for s in im["sentences"] for t in s["tokens"])
    assert set(itow.values()) == {w for w, n in counts.items() if n > 2} | {"UNK"}
    words = list(itow.values())[:-1]
    assert words == sorted(words, key=lambda w: (-counts[w], w)) and itow[len(itow)] == "UNK"
    s = data["images"][3]["sentences"][0]["tokens"]
    assert decode(itow, h5["labels"][15]).split() == [t if counts[t] > 2 else "UNK" for t in s[:16]]


def _tiny(tmp_path: Path, images: list, name="dataset_tiny.json") -> Path:
    """A Flickr-style dataset (no filepath, no cocoid) with real little image files."""
    for im in images:
        if "filename" in im:
            Image.new("RGB", (8, 8)).save(tmp_path / im["filename"])
    path = tmp_path / name
    path.write_text(json.dumps({"dataset": "tiny", "images": images}))
    return path


def _img(i, split, *caps):
    return {"filename": f"{i}.jpg", "imgid": i, "split": split,
            "sentences": [{"tokens": c.split(), "raw": c} for c in caps]}


def test_flickr_style_without_unk(tmp_path):
    path = _tiny(tmp_path, [_img(0, "train", "a dog runs", "a dog"), _img(1, "val", "a dog"),
                            _img(2, "test", "dog runs", "")])
    with pytest.warns(UserWarning, match="dropped 1 empty"):
        data = load_karpathy(path)
    assert image_path(data["images"][0], tmp_path) == tmp_path / "0.jpg" and image_id(data["images"][2]) == 2
    with pytest.warns(UserWarning):
        prepare(path, tmp_path, tmp_path / "out", word_count_threshold=0)
    h5, images, itow = _read(tmp_path / "out")
    assert itow == {1: "a", 2: "dog", 3: "runs"}  # no UNK: nothing needs it; ordered by count then name
    assert images[2] == {"id": 2, "file_path": "2.jpg", "split": "test"}
    assert list(h5["label_end_ix"]) == [2, 3, 4]
    assert decode(itow, [2, 3, 0, 1]) == "dog runs"


def _broken(tmp_path, mutate):
    imgs = [_img(i, "train", "a cat") for i in range(5)]
    mutate(imgs)
    return _tiny(tmp_path, imgs, name="x.json")


@pytest.mark.parametrize("mutate, message", [
    (lambda imgs: imgs[3].pop("sentences"), "image 3 has no 'sentences'"),
    (lambda imgs: imgs[3].pop("split"), "image 3 has no 'split'"),
    (lambda imgs: imgs[2].pop("filename"), "image 2 has no 'filename'"),
    (lambda imgs: imgs[1]["sentences"][0].pop("tokens"), "image 1 sentence 0 has no 'tokens'"),
    (lambda imgs: imgs[4].update(split="holdout"), "image 4: 'split' is 'holdout'"),
    (lambda imgs: imgs[4].update(imgid=0), "image 4 has the same id 0 as image 0"),
    (lambda imgs: imgs[0].update(sentences=[{"tokens": [], "raw": ""}]), "image 0 has no non-empty caption"),
])
def test_broken_dataset_names_file_image_and_field(tmp_path, mutate, message):
    path = _broken(tmp_path, mutate)
    with pytest.raises(UserError) as e:
        prepare(path, tmp_path, tmp_path / "out")
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_other_user_errors(tmp_path):
    (tmp_path / "noimages.json").write_text(json.dumps({"dataset": "x"}))
    with pytest.raises(UserError, match="noimages.json: no 'images'"):
        load_karpathy(tmp_path / "noimages.json")
    with pytest.raises(UserError, match="file not found"):
        load_karpathy(tmp_path / "missing.json")
    with pytest.raises(UserError, match="missing"):
        prepare(DATASET, tmp_path, tmp_path / "out")  # wrong image root
    with pytest.raises(UserError, match="image root"):
        prepare(DATASET, tmp_path / "nope", tmp_path / "out")
    path = _tiny(tmp_path, [_img(0, "val", "a cat")])
    with pytest.raises(UserError, match="no image has split 'train'"):
        prepare(path, tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="max_length"):
        prepare(DATASET, COCO5, tmp_path / "out", max_length=0)
    with pytest.raises(UserError, match="not in the vocabulary"):
        decode({1: "a"}, [1, 7])
    with pytest.raises(UserError, match="vocab.json"):
        load_vocab(tmp_path)


def test_deterministic(prepared, tmp_path):
    prepare(DATASET, COCO5, tmp_path, word_count_threshold=0, max_length=16)
    for name in ("vocab.json", "images.json", "refs_val.json", "refs_test.json", "info.json"):
        assert (tmp_path / name).read_bytes() == (prepared / name).read_bytes()
    assert all(np.array_equal(a, b) for a, b in zip(_read(tmp_path)[0].values(), _read(prepared)[0].values()))
