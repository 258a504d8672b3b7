"""A stand-in for COCO with Karpathy's counts, to plan the COCO-scale DAG where COCO cannot be had.

    python tools/simulate_coco.py OUT_DIR

writes ``OUT_DIR/dataset_coco.json`` (123,287 images, 5 captions each, split as Karpathy's:
82,783 train, 30,504 restval, 5,000 val, 5,000 test), ``OUT_DIR/images/`` (the 5 real COCO
images of tests/data/coco5, which every entry reuses by name) and ``OUT_DIR/config.yaml``:
configs/coco.yaml pointed at them, with an empty stand-in for the resnet101 weights file.
Then ``snakemake -n --profile profiles/slurm --workflow-profile none --configfile
OUT_DIR/config.yaml`` plans the whole paper-scale run, and tools/dag_resources.py shows what
each job would ask of SLURM. Nothing here can be trained on: the captions repeat.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "coco5"
SPLITS = {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}  # 123,287 in all


def karpathy_coco(splits: dict[str, int] = SPLITS) -> dict:
    """Karpathy's dataset_coco.json layout with COCO's counts, built from the 5 fixture images."""
    real = json.loads((FIXTURE / "dataset_coco_testing.json").read_text())["images"]
    images, sentid = [], 0
    for split, n in splits.items():
        for _ in range(n):
            src = real[len(images) % len(real)]
            sentences = []
            for s in src["sentences"][:5]:
                sentences.append({"tokens": s["tokens"], "raw": s["raw"], "imgid": len(images), "sentid": sentid})
                sentid += 1
            images.append({"filepath": src["filepath"], "filename": src["filename"], "imgid": len(images),
                           "cocoid": 1_000_000 + len(images), "split": split,
                           "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    return {"dataset": "coco", "images": images}


def simulate(out: Path) -> Path:
    """Write the stand-in dataset and its config under ``out``; returns the config's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset_coco.json").write_text(json.dumps(karpathy_coco()))
    for folder in ("train2014", "val2014"):
        shutil.copytree(FIXTURE / folder, out / "images" / folder, dirs_exist_ok=True)
    (out / "resnet101.safetensors").touch()  # planning only checks that the file exists
    cfg = yaml.safe_load((ROOT / "configs" / "coco.yaml").read_text())
    cfg["dataset"].update(json=str(out / "dataset_coco.json"), image_root=str(out / "images"))
    cfg["encoders"]["r101"]["weights"] = str(out / "resnet101.safetensors")
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    print(simulate(ap.parse_args(argv).out))


if __name__ == "__main__":
    main()
