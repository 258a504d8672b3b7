"""Image loading: a JPEG decoded at reduced scale for a small encoder, every other image as before."""
from pathlib import Path

import pytest
from PIL import Image

from captioning.data.images import load_rgb, load_tensor, to_tensor

COCO5 = Path(__file__).parent / "data" / "coco5"
COCO_IMAGES = sorted(COCO5.glob("*2014/*.jpg"))


@pytest.mark.parametrize("path", COCO_IMAGES, ids=lambda p: p.name)
def test_jpeg_decodes_at_the_smallest_scale_that_covers_the_size(path):
    full = load_rgb(path)
    small = load_rgb(path, 128)
    # 1/2 scale: 1/4 would drop a side below 128 on every one of these photos
    assert small.size == ((full.width + 1) // 2, (full.height + 1) // 2)
    assert min(small.size) >= 128 and small.mode == "RGB"
    # what the encoder sees is nearly the same picture: within 0.05 on average (normalised units,
    # where the full range is about 4.5)
    diff = (to_tensor(full, 128) - to_tensor(small, 128)).abs()
    assert float(diff.mean()) < 0.05
    assert load_tensor(path, 128).shape == (3, 128, 128)
    assert float((load_tensor(path, 128) - to_tensor(small, 128)).abs().max()) == 0.0


def test_a_large_size_or_a_png_decodes_in_full(tmp_path):
    path = COCO_IMAGES[0]
    assert load_rgb(path, 480).size == load_rgb(path).size  # 1/2 scale would not cover 480
    png = tmp_path / "x.png"
    Image.open(path).save(png)
    assert load_rgb(png, 64).size == Image.open(path).size  # draft is a JPEG decoder feature only


def test_grayscale_and_cmyk_jpegs_still_come_out_rgb(tmp_path):
    im = Image.open(COCO_IMAGES[0])
    for mode in ("L", "CMYK"):
        p = tmp_path / f"{mode}.jpg"
        im.convert(mode).save(p)
        out = load_rgb(p, 128)
        assert out.mode == "RGB" and out.size == (320, 240)
