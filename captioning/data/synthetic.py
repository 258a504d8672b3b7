"""A small synthetic captioning dataset that ships with the package, so the whole pipeline runs offline.

Each image shows 1-4 flat shapes (8 shapes x 8 colours x 2 sizes, slightly rotated) on a dark or light
background with clutter (thin lines, specks) and pixel noise. Every image gets 5 different captions in
Karpathy's format, drawn from templates that describe attributes ("a large red circle"), counts ("two blue
squares and a green star"), spatial relations ("a red circle to the left of a green star") and positions
("a small cyan ring in the top left corner"), with synonyms ("big"/"large", "shape"/"object") so that,
as with COCO, no single caption is the answer. A model must get colours, shapes, sizes, counts and layout
right to score well, so bigger and better models score differently.

Relations are read off the object boxes that ``objects.json`` stores (pixel coords of the saved image):
  A to the left of B   A.x1 <= B.x0        A to the right of B  A.x0 >= B.x1
  A above B            A.y1 <= B.y0        A below B            A.y0 >= B.y1
  A next to B          left/right of each other, their y ranges overlap, gap <= NEXT_TO_GAP * img_size
Objects never overlap, so every pair has at least one relation.

``objects.json`` labels (multi-hot, for encoder pretraining): one per shape ("circle"), one per colour
("red") and one per colour+shape pair ("red circle"): 8 + 8 + 64 = 80 labels, in that order.
Its layout: {"label_names", "img_size", "images": [{"cocoid", "labels", "objects": [{"shape", "color",
"size", "bbox": [x0, y0, x1, y1]}]}]}, in the order of dataset_synth.json.

Each image is drawn from its own random stream, seeded by (seed, split, index), so the val and test sets
do not change when ``n_train`` does, and the same seed gives byte-identical files.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..errors import UserError
from ..io import write_bytes, write_json

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLORS = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (35, 75, 220),
    "yellow": (240, 215, 30),
    "purple": (140, 50, 190),
    "orange": (245, 135, 20),
    "pink": (245, 130, 190),
    "cyan": (40, 205, 215),
}
SIZES = {"small": (0.055, 0.08), "large": (0.12, 0.165)}  # half-extent as a fraction of img_size
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
NEXT_TO_GAP = 0.25
MAX_WORDS = 16  # captions are kept within the default max_length of prepare
SPLITS = ("train", "val", "test")
LABEL_NAMES = list(SHAPES) + list(COLORS) + [f"{c} {s}" for c in COLORS for s in SHAPES]
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges like a real photo
JPEG_QUALITY = 90  # a third of the PNG size: the pixel noise does not compress losslessly


# ---------------------------------------------------------------- scene layout

def _sample_scene(rng: np.random.Generator, img_size: int) -> dict:
    """Pick the background tone and 1-4 non-overlapping objects with their exact boxes."""
    n = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2]))
    margin, gap = 2.0, 0.03 * img_size
    objects, boxes = [], []  # boxes: the square c +- r each shape fits in, for the overlap test
    for _ in range(n):
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        size = "large" if rng.random() < 0.45 else "small"
        placed = None
        for attempt in range(120):
            if attempt == 60:
                size = "small"  # crowded: try a small one before giving up on this object
            lo, hi = SIZES[size]
            r = float(rng.uniform(lo, hi)) * img_size
            cx, cy = rng.uniform(r + margin, img_size - r - margin, size=2)
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(box[2] + gap <= b[0] or b[2] + gap <= box[0] or box[3] + gap <= b[1] or b[3] + gap <= box[1]
                   for b in boxes):
                placed = (float(cx), float(cy), r)
                break
        if placed is None:
            continue
        boxes.append(box)
        cx, cy, r = placed
        angle = float(rng.uniform(-12, 12)) if shape not in ("circle", "ring") else 0.0
        verts = _vertices(shape, cx, cy, r, angle)
        if verts is None:
            bbox = [cx - r, cy - r, cx + r, cy + r]
        else:
            xs, ys = [v[0] for v in verts], [v[1] for v in verts]
            bbox = [min(xs), min(ys), max(xs), max(ys)]
        jitter = rng.integers(-18, 19, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], jitter))
        objects.append(dict(shape=shape, color=color, size=size, bbox=[round(v, 1) for v in bbox],
                            _center=(cx, cy), _r=r, _verts=verts, _rgb=rgb))
    return dict(tone="dark" if rng.random() < 0.5 else "light", objects=objects)


def _vertices(shape: str, cx: float, cy: float, r: float, angle_deg: float) -> list | None:
    """Polygon vertices in image pixels; None for the round shapes (drawn as ellipses)."""
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "diamond":
        pts = [(0, -1), (0.72, 0), (0, 1), (-0.72, 0)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(0, 360, 60))]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.42) * math.cos(a), (1.0 if k % 2 == 0 else 0.42) * math.sin(a))
               for k, a in enumerate(np.deg2rad(np.arange(-90, 270, 36)))]
    elif shape == "cross":
        w = 0.32
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    else:
        return None
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


# ---------------------------------------------------------------- rendering

def _render(scene: dict, rng: np.random.Generator, img_size: int) -> Image.Image:
    S = img_size * SUPERSAMPLE
    dark = scene["tone"] == "dark"
    base = rng.integers(25, 75, size=3) if dark else rng.integers(175, 230, size=3)
    base = (base * 0.6 + base.mean() * 0.4).astype(int)  # a muted tint, never a named colour
    # a soft vertical gradient so the background is not one flat value
    ramp = np.linspace(-1, 1, S)[:, None, None] * rng.uniform(-18, 18)
    bg = np.clip(base[None, None, :] + ramp, 0, 255).astype(np.uint8)
    im = Image.fromarray(np.broadcast_to(bg, (S, S, 3)).copy())
    draw = ImageDraw.Draw(im)

    def clutter_color():
        named = np.array(list(COLORS.values())[rng.integers(len(COLORS))])
        mix = rng.uniform(0.15, 0.4)
        return tuple(int(v) for v in base * (1 - mix) + named * mix)

    for _ in range(int(rng.integers(3, 10))):  # thin lines
        x0, y0, x1, y1 = rng.uniform(0, S, size=4)
        draw.line([(x0, y0), (x1, y1)], fill=clutter_color(), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(20, 80))):  # specks
        x, y = rng.uniform(0, S, size=2)
        rad = rng.uniform(0.5, 2.0)
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=clutter_color())

    k = SUPERSAMPLE
    for o in scene["objects"]:
        if o["_verts"] is not None:
            draw.polygon([(x * k, y * k) for x, y in o["_verts"]], fill=o["_rgb"])
        else:
            (cx, cy), r = o["_center"], o["_r"]
            box = [(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k]
            if o["shape"] == "ring":
                draw.ellipse(box, outline=o["_rgb"], width=max(2, int(0.32 * r * k)))
            else:
                draw.ellipse(box, fill=o["_rgb"])

    im = im.resize((img_size, img_size), Image.BOX)
    noise = rng.normal(0.0, rng.uniform(4, 14), size=(img_size, img_size, 3))
    arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


# ---------------------------------------------------------------- relations and captions

def relations(a: dict, b: dict, img_size: int) -> list[str]:
    """The relations (of the five in the module docstring) that hold for 'a REL b', on the stored boxes."""
    ax0, ay0, ax1, ay1 = a["bbox"]
    bx0, by0, bx1, by1 = b["bbox"]
    out = []
    if ax1 <= bx0:
        out.append("to the left of")
    if ax0 >= bx1:
        out.append("to the right of")
    if ay1 <= by0:
        out.append("above")
    if ay0 >= by1:
        out.append("below")
    hgap = max(bx0 - ax1, ax0 - bx1)
    if hgap >= 0 and ay0 < by1 and by0 < ay1 and hgap <= NEXT_TO_GAP * img_size:
        out.append("next to")
    return out


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _desc(o: dict, rng: np.random.Generator, with_size: bool | None = None) -> str:
    """'a large red circle' or 'a red circle'; size shown at random unless forced."""
    if with_size is None:
        with_size = rng.random() < 0.5
    words = ([SIZE_WORDS[o["size"]][rng.integers(2)]] if with_size else []) + [o["color"], o["shape"]]
    return _a(" ".join(words))


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else " ".join(parts[:-1]) + " and " + parts[-1]


def _noun(rng) -> str:
    return ("shape", "object")[rng.integers(2)]


def _position(o: dict, img_size: int) -> str:
    cx, cy = o["_center"]
    col = min(int(3 * cx / img_size), 2)
    row = min(int(3 * cy / img_size), 2)
    v, h = ("top", "middle", "bottom")[row], ("left", "center", "right")[col]
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return f"on the {h} side"
    if col == 1:
        return f"near the {v}"
    return f"in the {v} {h} corner"


def _t_inventory(scene, rng, img_size):
    objs = scene["objects"]
    parts = [_desc(o, rng) for o in objs]
    body = parts[0] if len(parts) == 1 else parts[0] + " with " + _join(parts[1:])
    intro = ("", "there is ", "an image of ", "a picture of ", "a drawing of ")[rng.integers(5)]
    tail = f" on a {scene['tone']} background" if rng.random() < 0.4 else ""
    return intro + body + tail


def _t_groups(scene, rng, img_size):
    groups: dict[tuple, int] = {}
    for o in scene["objects"]:
        groups[(o["color"], o["shape"])] = groups.get((o["color"], o["shape"]), 0) + 1
    order = list(groups)
    rng.shuffle(order)
    parts = [(_a(f"{c} {s}") if n == 1 else f"{NUMBERS[n]} {c} {_plural(s)}") for (c, s), n in
             ((k, groups[k]) for k in order)]
    if rng.random() < 0.4:
        first_plural = not parts[0].startswith(("a ", "an "))
        return ("there are " if first_plural else "there is ") + _join(parts)
    return _join(parts)


def _t_shape_counts(scene, rng, img_size):
    counts: dict[str, int] = {}
    for o in scene["objects"]:
        counts[o["shape"]] = counts.get(o["shape"], 0) + 1
    parts = [(_a(s) if n == 1 else f"{NUMBERS[n]} {_plural(s)}") for s, n in sorted(counts.items())]
    cols = {o["color"] for o in scene["objects"]}
    if len(cols) == 1 and len(scene["objects"]) > 1:
        return f"{NUMBERS[len(scene['objects'])]} {cols.pop()} {_noun(rng)}s"
    return _join(parts) + f" on a {scene['tone']} background"


def _t_relation(scene, rng, img_size):
    objs = scene["objects"]
    if len(objs) < 2:
        return None
    pairs = [(i, j, rel) for i in range(len(objs)) for j in range(len(objs)) if i != j
             for rel in relations(objs[i], objs[j], img_size)]
    i, j, rel = pairs[rng.integers(len(pairs))]
    a, b = _desc(objs[i], rng), _desc(objs[j], rng)
    form = rng.integers(3)
    return (f"{a} {rel} {b}", f"{a} is {rel} {b}", f"there is {a} {rel} {b}")[form]


def _t_position(scene, rng, img_size):
    o = scene["objects"][rng.integers(len(scene["objects"]))]
    return f"{_desc(o, rng)} {_position(o, img_size)}"


def _t_salient(scene, rng, img_size):
    objs = scene["objects"]
    big = max(objs, key=lambda o: o["_r"])
    d = _desc(big, rng, with_size=rng.random() < 0.7)
    if len(objs) == 1:
        bare = d.split(" ", 1)[1]
        return (f"a single {bare}", f"{d} on a {scene['tone']} background", f"just one {bare}")[rng.integers(3)]
    rest = len(objs) - 1
    others = f"{NUMBERS[rest]} other {_noun(rng)}" + ("s" if rest > 1 else "")
    return (f"{d} and {others}", f"{d} among {others}" if rest > 1 else f"{d} beside another {_noun(rng)}",
            f"{NUMBERS[len(objs)]} {_noun(rng)}s including {d}")[rng.integers(3)]


TEMPLATES = (_t_inventory, _t_groups, _t_shape_counts, _t_relation, _t_position, _t_salient)


def _captions(scene: dict, rng: np.random.Generator, img_size: int, n: int = 5) -> list[str]:
    """n different captions, each from a different template where possible, at most MAX_WORDS words."""
    chosen: list[str] = []
    for _ in range(20):
        order = rng.permutation(len(TEMPLATES))
        for t in order:
            for _ in range(4):  # a template may give a too-long caption; it re-draws its choices
                c = TEMPLATES[t](scene, rng, img_size)
                if c is not None and len(c.split()) <= MAX_WORDS:
                    break
            if c is not None and len(c.split()) <= MAX_WORDS and c not in chosen:
                chosen.append(c)
            if len(chosen) == n:
                return chosen
    raise RuntimeError("could not make enough distinct captions")  # a bug, not a user error


# ---------------------------------------------------------------- the dataset

def _labels(objects: list[dict]) -> list[int]:
    idx = {name: i for i, name in enumerate(LABEL_NAMES)}
    labs = {idx[o["shape"]] for o in objects} | {idx[o["color"]] for o in objects}
    labs |= {idx[f"{o['color']} {o['shape']}"] for o in objects}
    return sorted(labs)


def generate(out_dir, n_train: int = 2000, n_val: int = 200, n_test: int = 300, img_size: int = 128,
             seed: int = 0) -> Path:
    """Write the synthetic dataset under ``out_dir`` and return the path of its dataset_synth.json.

    Layout: ``dataset_synth.json`` (Karpathy format), ``objects.json`` (boxes and multi-hot labels) and
    ``images/{split}/{imgid:06d}.jpg``; the image root to pass on is ``out_dir/images``.
    """
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if int(v) < 0:
            raise UserError(f"synthetic dataset: {name} must be >= 0, got {v}")
    if int(img_size) < 32:
        raise UserError(f"synthetic dataset: img_size must be >= 32, got {img_size}")
    out_dir = Path(out_dir)
    counts = dict(train=int(n_train), val=int(n_val), test=int(n_test))
    jobs = [(split, k) for split in SPLITS for k in range(counts[split])]

    images, objects_out = [], []
    sentid = 0
    for imgid, (split, k) in enumerate(tqdm(jobs, desc="synthetic images", unit="img")):
        rng = np.random.default_rng([int(seed), SPLITS.index(split), k])
        scene = _sample_scene(rng, img_size)
        im = _render(scene, rng, img_size)
        caps = _captions(scene, rng, img_size)

        filename = f"{imgid:06d}.jpg"
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps small shapes' colours
        write_bytes(out_dir / "images" / split / filename, buf.getvalue())

        sentences = []
        for c in caps:
            raw = c[0].upper() + c[1:] + "."
            tokens = c.split()
            sentences.append(dict(tokens=tokens, raw=raw, imgid=imgid, sentid=sentid))
            sentid += 1
        images.append(dict(filepath=split, filename=filename, imgid=imgid, cocoid=imgid, split=split,
                           sentids=[s["sentid"] for s in sentences], sentences=sentences))
        objs = [{key: o[key] for key in ("shape", "color", "size", "bbox")} for o in scene["objects"]]
        objects_out.append(dict(cocoid=imgid, labels=_labels(scene["objects"]), objects=objs))

    write_json(out_dir / "objects.json", dict(label_names=LABEL_NAMES, img_size=int(img_size),
                                              images=objects_out), indent=None)
    path = out_dir / "dataset_synth.json"
    write_json(path, dict(dataset="synth", images=images), indent=None)
    return path
