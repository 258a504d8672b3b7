"""Training stages over cached features: one loop (``loop.fit``) and the steps that plug into it.

- ``xe.train_xe``: cross-entropy (and, with a teacher, distillation: ``distill``);
- ``finetune.finetune_pruned``: pruning, then cross-entropy with the masks held;
- ``scst.train_scst``: self-critical sequence training on CIDEr-D.
"""
from .finetune import finetune_pruned
from .loader import Batch, CaptionData
from .scst import train_scst
from .xe import train_xe

__all__ = ["Batch", "CaptionData", "finetune_pruned", "train_scst", "train_xe"]
