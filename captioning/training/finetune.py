"""Pruned fine-tuning: prune a trained decoder, then train it on with the masks held.

Cross-entropy training (``xe.train_xe``) with a ``compress.prune.Pruner`` as the loop's mask hook.
"""
from __future__ import annotations

from ..compress.prune import Pruner
from .xe import train_xe


def finetune_pruned(decoder_ckpt, features_h5, prepared_dir, out_path, method: str, ratio: float,
                    epochs: int = 2, lr: float = 1e-4, kd_weight: float = 0.0, kd_temperature: float = 2.0,
                    kd_mode: str = "word", kd_teacher: str = "self", teacher=None, schedule_epochs: int | None = None,
                    **train_kwargs) -> dict:
    """Prune ``decoder_ckpt`` with ``method`` at ``ratio`` and fine-tune it with XE, masks held.

    The decoder is rebuilt from the checkpoint's own config; ``train_kwargs`` go to ``train_xe``
    (``stage`` defaults to "prune", or "control" at ratio 0: the same fine-tuning with nothing pruned,
    the dense control of a pruning sweep). Returns ``train_xe``'s report; the kept checkpoint's
    metadata holds the measured sparsity.

    ``schedule_epochs`` (default: ``epochs``) is how long ``gradual`` takes to reach ``ratio``; the
    epochs after it fine-tune at ``ratio``, and the best of them is kept, so the model recovers at
    its final sparsity instead of being kept the moment it gets there.

    ``kd_weight`` > 0 distils from ``decoder_ckpt`` itself, unpruned, over the same features: the
    pruned model learns back the word distributions it had before the cut, a teacher that costs no
    training of its own (``distill.DistillStep``; the references get 1 - ``kd_weight``). ``kd_mode``
    "sequence" teaches its beam-search captions instead (``distill`` explains both). ``kd_teacher``
    "scst" teaches from ``teacher``, the same decoder after self-critical training (the family's
    strongest model, over the same features), instead of the dense model itself.
    """
    from ..errors import UserError

    train_kwargs.setdefault("stage", "prune" if ratio else "control")
    if kd_teacher not in ("self", "scst"):
        raise UserError(f"kd_teacher must be self or scst, not {kd_teacher!r}")
    if teacher is not None and not (kd_teacher == "scst" and kd_weight):
        raise UserError("--teacher is for kd_teacher scst with kd_weight > 0 only")
    if kd_weight and kd_teacher == "scst" and teacher is None:
        raise UserError("kd_teacher scst needs the SCST decoder as --teacher")
    if kd_weight:
        train_kwargs.update(teacher=teacher or decoder_ckpt, teacher_features=features_h5, kd_weight=kd_weight,
                            kd_temperature=kd_temperature, kd_mode=kd_mode)
    return train_xe(features_h5, prepared_dir, out_path, train_kwargs.pop("decoder_name", None),
                    train_kwargs.pop("decoder_cfg", None), epochs=epochs, lr=lr, init_from=decoder_ckpt,
                    pruner=Pruner(method, ratio, schedule_epochs or epochs), **train_kwargs)
