"""CIDEr-D, vectorised with NumPy: the same numbers as pycocoevalcap's ``Cider``, many times faster.

Definition (coco-caption's CIDEr-D, as pycocoevalcap computes it). For an image with references
r_1..r_m and a candidate c, each sentence becomes, per n-gram order n = 1..4, a vector of
tf * (log N - log max(1, df)), where N is the number of images in the reference corpus and df the
number of those images whose references contain the n-gram. Then

    CIDEr-D(c) = 10 / m * sum_j mean_n  sum_g min(c_g, r_jg) r_jg / (|c_n| |r_jn|) * exp(-d_j^2 / 72)

with the candidate's weights clipped by the reference's, and d_j a length difference. One quirk
is kept for parity: pycocoevalcap's "length" is the number of bigrams (words - 1), not of words.

Why our own: pycocoevalcap walks Python dicts of n-gram tuples for every (candidate, reference)
pair, and rebuilds everything at each call. Self-critical training scores thousands of sampled
captions per epoch against fixed training references, so here the n-grams become integer ids
(exactly, without hashing: an n-gram's id is the rank of (id of its (n-1)-gram prefix, last
word)), the references' tf-idf vectors are computed once as sorted arrays, and a candidate's
weights are matched to its references' with one ``searchsorted``.

Two entry points: ``CiderD(refs)`` fixes the document frequencies (e.g. the training references,
the SCST reward) and ``.scores(image_ids, candidates)`` scores any number of candidates;
``corpus_cider_d(gts, res)`` is pycocoevalcap's ``Cider().compute_score`` (df from the
references being scored). Sentences must already be tokenised: words are split on whitespace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Hashable, Sequence

import numpy as np

from ..errors import UserError

_SHIFT = np.int64(1 << 31)  # n-gram key = prefix id * _SHIFT + last word id (both < 2**31)


def _unique(x: np.ndarray, inverse: bool = False, counts: bool = False):
    """Sorted unique values (+ inverse or counts) of an int64 array, by sorting: numpy 2's default
    hash-based ``np.unique`` is about 10 times slower on these arrays. Without ``inverse`` the
    input is sentence- or image-major, i.e. nearly sorted, which timsort ("stable") does in
    near-linear time, 4x faster than quicksort."""
    order = np.argsort(x) if inverse else None
    s = x[order] if inverse else np.sort(x, kind="stable")
    first = np.empty(len(s), dtype=bool)
    first[:1] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    u = s[first]
    if inverse:
        inv = np.empty(len(x), dtype=np.int64)
        inv[order] = np.cumsum(first) - 1
        return u, inv
    if counts:
        starts = np.flatnonzero(first)
        return u, np.diff(np.append(starts, len(s)))
    return u


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for counts [c0, c1, ...]."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - starts


@dataclass
class _NGrams:
    """Per-sentence n-gram counts; list item k holds order k + 1, sorted by (sentence, id)."""
    sent: list[np.ndarray] = field(default_factory=list)    # sentence index of each entry
    ids: list[np.ndarray] = field(default_factory=list)     # n-gram id
    count: list[np.ndarray] = field(default_factory=list)   # term frequency (float64)


class CiderD:
    """CIDEr-D with document frequencies fixed by ``refs_by_image`` {image id: [tokenised caption, ...]}."""

    def __init__(self, refs_by_image: dict[Hashable, Sequence[str]], n: int = 4, sigma: float = 6.0):
        if not refs_by_image:
            raise UserError("CIDEr-D: no reference captions given")
        self.n, self.sigma = int(n), float(sigma)
        self.image_ids = list(refs_by_image)
        self._row = {i: k for k, i in enumerate(self.image_ids)}
        refs = [list(refs_by_image[i]) for i in self.image_ids]
        empty = [i for i, r in zip(self.image_ids, refs) if not r]
        if empty:
            raise UserError(f"CIDEr-D: image {empty[0]!r} has no reference captions")
        if any(not isinstance(s, str) for r in refs for s in r):
            raise UserError("CIDEr-D: reference captions must be strings")

        # references of image k are sentences ref_start[k] .. ref_start[k] + ref_count[k] - 1
        self.ref_count = np.array([len(r) for r in refs], dtype=np.int64)
        self.ref_start = np.cumsum(self.ref_count) - self.ref_count
        self.log_n = float(np.log(float(len(refs))))

        self.words: dict[str, int] = {}
        words, lens = self._word_ids([s for r in refs for s in r], grow=True)
        self.tables: list[np.ndarray] = []   # order k >= 1: sorted keys; an n-gram's id is its rank
        grams = self._count(words, lens, build=True)

        # document frequency: the number of images whose references contain the n-gram
        image_of_ref = np.repeat(np.arange(len(refs), dtype=np.int64), self.ref_count)
        self.df = []
        for k in range(self.n):
            size = self._size(k)
            pairs = _unique(image_of_ref[grams.sent[k]] * size + grams.ids[k])
            self.df.append(np.bincount(pairs % size, minlength=size).astype(np.float64))

        vals, norms, self.ref_len = self._vectors(grams, len(lens))
        self.ref_norm = norms                                                    # [R, n]
        # every reference weight under the key (order, reference, n-gram id): each order's entries
        # are already sorted by (reference, id), so the concatenation is sorted too
        self._span = np.int64(max(self._size(k) for k in range(self.n)) + 1)
        self._n_refs = np.int64(len(lens))
        self.ref_keys = np.concatenate([(k * self._n_refs + grams.sent[k]) * self._span + grams.ids[k]
                                        for k in range(self.n)])
        self.ref_vals = np.concatenate(vals)

    # ---- sentences -> n-gram counts ----------------------------------------------------------

    def _size(self, k: int) -> int:
        return len(self.words) if k == 0 else len(self.tables[k - 1])

    def _word_ids(self, sentences: Sequence[str], grow: bool) -> tuple[np.ndarray, np.ndarray]:
        """Flat word ids and sentence lengths. Unknown words (``grow=False``) get ids past the vocabulary,
        distinct per word within the call, so their counts are still right."""
        split = [s.split() for s in sentences]
        lens = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
        flat = list(chain.from_iterable(split))
        lookup = self.words
        if grow:
            for w in dict.fromkeys(flat):
                lookup.setdefault(w, len(lookup))
        else:
            unknown = [w for w in dict.fromkeys(flat) if w not in lookup]
            if unknown:
                lookup = {**lookup, **{w: len(lookup) + i for i, w in enumerate(unknown)}}
        return np.fromiter(map(lookup.__getitem__, flat), dtype=np.int64, count=len(flat)), lens

    def _count(self, words: np.ndarray, lens: np.ndarray, build: bool) -> _NGrams:
        """Count each sentence's n-grams. ``build`` makes the id tables (references); otherwise
        n-grams not in them (candidates) get fresh ids >= the table size."""
        sent_of_tok = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        left = np.repeat(lens, lens) - _ragged_arange(lens)   # tokens from here to the sentence end
        out = _NGrams()
        cur = words                                           # id of the n-gram starting at each token
        for k in range(self.n):
            if k > 0:
                ok = np.flatnonzero(left > k)
                key = cur[ok] * _SHIFT + words[ok + k]
                cur = np.full(len(words), -1, dtype=np.int64)
                if build:
                    table, cur[ok] = _unique(key, inverse=True)
                    self.tables.append(table)
                else:
                    table = self.tables[k - 1]
                    pos = np.minimum(np.searchsorted(table, key), max(len(table) - 1, 0))
                    found = table[pos] == key if len(table) else np.zeros(len(key), dtype=bool)
                    ids = np.where(found, pos, -1)
                    new = ~found
                    if new.any():
                        ids[new] = len(table) + _unique(key[new], inverse=True)[1]
                    cur[ok] = ids
            valid = cur >= 0
            span = np.int64(cur.max(initial=0) + 1)
            pairs, counts = _unique(sent_of_tok[valid] * span + cur[valid], counts=True)
            out.sent.append(pairs // span)
            out.ids.append(pairs % span)
            out.count.append(counts.astype(np.float64))
        return out

    def _vectors(self, grams: _NGrams, n_sent: int):
        """tf-idf weights per entry, norms [S, n], and lengths [S] (bigram counts, as pycocoevalcap)."""
        vals, norms = [], np.zeros((n_sent, self.n))
        for k in range(self.n):
            df = self.df[k]
            ids = grams.ids[k]
            known = ids < len(df)
            d = np.zeros(len(ids))
            d[known] = df[ids[known]]
            v = grams.count[k] * (self.log_n - np.log(np.maximum(1.0, d)))
            vals.append(v)
            norms[:, k] = np.sqrt(np.bincount(grams.sent[k], weights=v * v, minlength=n_sent))
        length = (np.bincount(grams.sent[1], weights=grams.count[1], minlength=n_sent)
                  if self.n > 1 else np.zeros(n_sent))
        return vals, norms, length

    # ---- scoring -----------------------------------------------------------------------------

    def scores(self, image_ids: Sequence[Hashable], candidates: Sequence[str]) -> np.ndarray:
        """CIDEr-D of ``candidates[i]`` against the references of ``image_ids[i]``: float64 [len]."""
        if len(image_ids) != len(candidates):
            raise ValueError(f"{len(image_ids)} image ids for {len(candidates)} candidates")
        try:
            img = np.array([self._row[i] for i in image_ids], dtype=np.int64)
        except KeyError as e:
            raise UserError(f"CIDEr-D: no reference captions for image id {e.args[0]!r}") from None
        C = len(candidates)
        if C == 0:
            return np.zeros(0)
        words, lens = self._word_ids(candidates, grow=False)
        grams = self._count(words, lens, build=False)
        vals, norm, length = self._vectors(grams, C)

        # pairs (candidate c, each reference j of its image); pair p of c is pair_start[c] + local j
        nref = self.ref_count[img]
        pair_start = np.cumsum(nref) - nref
        pair_ref = np.repeat(self.ref_start[img], nref) + _ragged_arange(nref)    # [P]
        P = len(pair_ref)

        # clipped dot products. Each candidate n-gram is looked up in each reference of its image;
        # queries go reference by reference, n-grams sorted, so they arrive (nearly) in key order,
        # which keeps ``searchsorted`` cache-friendly.
        num = np.zeros(P * self.n)
        for k in range(self.n if len(self.ref_keys) else 0):
            keep = grams.ids[k] < self._size(k)                  # unseen n-grams match nothing
            c, g, v = grams.sent[k][keep], grams.ids[k][keep], vals[k][keep]
            n_ent = np.bincount(c, minlength=C)                  # entries per candidate, contiguous
            ent_start = np.cumsum(n_ent) - n_ent
            local = _ragged_arange(n_ent * nref)                 # per candidate: reference-major blocks
            cand = np.repeat(np.arange(C), n_ent * nref)
            j, e = np.divmod(local, np.maximum(n_ent, 1)[cand])
            pair, e = pair_start[cand] + j, ent_start[cand] + e
            key = (k * self._n_refs + pair_ref[pair]) * self._span + g[e]
            pos = np.minimum(np.searchsorted(self.ref_keys, key), len(self.ref_keys) - 1)
            vr = np.where(self.ref_keys[pos] == key, self.ref_vals[pos], 0.0)
            num += np.bincount(pair * self.n + k, weights=np.minimum(v[e], vr) * vr, minlength=P * self.n)
        num = num.reshape(P, self.n)

        pair_cand = np.repeat(np.arange(C), nref)
        denom = norm[pair_cand] * self.ref_norm[pair_ref]
        sim = np.divide(num, denom, out=num.copy(), where=denom != 0)
        delta = length[pair_cand] - self.ref_len[pair_ref]
        sim *= np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, None]
        per_pair = sim.mean(1)
        return np.bincount(pair_cand, weights=per_pair, minlength=C) / nref * 10.0


def corpus_cider_d(gts: dict[Any, Sequence[str]], res: dict[Any, str | Sequence[str]],
                   n: int = 4, sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """Drop-in for pycocoevalcap's ``Cider().compute_score(gts, res)``: (mean, per-image scores in gts order).

    Document frequencies come from ``gts``, the references of the images being scored. ``res``
    values are a caption or a one-caption list, as pycocoevalcap takes them.
    """
    if set(gts) != set(res):
        odd = next(iter(set(gts) ^ set(res)))
        raise UserError(f"CIDEr-D: image {odd!r} is in only one of references and candidates")
    ids = list(gts)
    cands = []
    for i in ids:
        c = res[i]
        if not isinstance(c, str):
            if len(c) != 1:
                raise UserError(f"CIDEr-D: image {i!r} needs exactly one candidate caption, got {len(c)}")
            c = c[0]
        cands.append(c)
    s = CiderD(gts, n=n, sigma=sigma).scores(ids, cands)
    return float(s.mean()), s
