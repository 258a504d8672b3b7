"""Confidence intervals of a CIDEr change: a paired bootstrap over the test images.

Corpus CIDEr-D is the mean of per-image scores, so a variant's CIDEr change against its reference
is ``mean(row) / mean(ref) - 1``. Both models captioned the same images, so each resample draws one
set of images (with replacement) and scores both models on it: the pairing removes the images'
shared difficulty from the interval, which is what makes a 1-2% difference resolvable at all. The
interval is the percentile one (the resamples' 2.5th and 97.5th percentiles at 95%).
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError

N_RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def paired_scores(row: dict, ref: dict, row_name: str = "row", ref_name: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """Per-image scores {image id: score} of two models as aligned arrays; both must cover the same images."""
    if set(row) != set(ref):
        odd = sorted(set(row) ^ set(ref), key=str)
        raise UserError(f"{row_name} and {ref_name} were scored on different test images "
                        f"(e.g. image {odd[0]}); evaluate both on the same split")
    ids = sorted(ref, key=str)
    return np.array([row[i] for i in ids], dtype=np.float64), np.array([ref[i] for i in ids], dtype=np.float64)


def relative_changes(row: np.ndarray, ref: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Percent change of the mean score, ``mean(row[s]) / mean(ref[s]) - 1``, for each resample ``s`` (a row of
    ``samples``, image indices). A resample whose reference mean is 0 gives NaN."""
    r, b = row[samples].mean(1), ref[samples].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, (r / b - 1.0) * 100.0, np.nan)


def change_interval(row: np.ndarray, ref: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                    level: float = LEVEL) -> tuple[float, float]:
    """(low, high) percent CIDEr change of ``row`` against ``ref`` at ``level``: paired bootstrap, fixed seed."""
    if len(row) != len(ref) or len(ref) == 0:
        raise UserError(f"bootstrap needs per-image scores of the same images, got {len(row)} and {len(ref)}")
    samples = np.random.default_rng(seed).integers(0, len(ref), size=(n_resamples, len(ref)))
    changes = relative_changes(row, ref, samples)
    changes = changes[~np.isnan(changes)]
    if changes.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(changes, [tail, 100.0 - tail])
    return float(low), float(high)


def change_with_interval(per_image: dict, row: str, ref: str, cider: float, ref_cider: float) -> tuple[float, float, float]:
    """(percent CIDEr change of ``row`` against ``ref``, 95% low, 95% high); no interval without per-image
    scores, and no change at all against a reference that scored 0."""
    if not ref_cider > 0:
        return float("nan"), float("nan"), float("nan")
    change = (cider / ref_cider - 1.0) * 100.0
    if row not in per_image or ref not in per_image:
        return change, float("nan"), float("nan")
    low, high = change_interval(*paired_scores(per_image[row], per_image[ref], row, ref))
    return change, low, high
