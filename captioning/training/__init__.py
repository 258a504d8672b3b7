"""Training stages: a data source over features + prepared captions, and cross-entropy training."""
from .loader import Batch, CaptionData
from .xe import train_xe

__all__ = ["Batch", "CaptionData", "train_xe"]
