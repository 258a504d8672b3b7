"""Evaluation: COCO caption metrics exactly as the official pycocoevalcap computes them."""
from .java import ensure_java
from .metrics import METRICS, bundled_coco_refs, ptb_tokenize, score_captions, spice_available

__all__ = ["METRICS", "bundled_coco_refs", "ensure_java", "ptb_tokenize", "score_captions", "spice_available"]
