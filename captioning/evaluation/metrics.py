"""COCO caption metrics, computed exactly as pycocoevalcap's ``COCOEvalCap.evaluate`` does.

We feed pycocoevalcap's own scorers the same tokenized captions in the same order, so every
number is identical to the official evaluation (tests/test_metrics.py checks a published
model's scores to 1e-12). We do not use ``COCOEvalCap`` itself because it
- writes temporary files into site-packages (fails on read-only installs),
- leaves METEOR's java process for the garbage collector to close,
- downloads Stanford CoreNLP when SPICE is constructed, which fails offline,
- and SPICE's jar writes its results through the Nashorn JavaScript engine, gone since Java 15.

Order matters for bit-exact floats: images follow the reference file's ``images`` list,
restricted to the ids in the results (what ``COCO.loadRes`` + ``cocoRes.getImgIds()`` give),
and each image's references keep their order in ``annotations``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pycocoevalcap

from ..errors import UserError
from .java import ensure_java, java_version
from .refs import load_refs, load_results

log = logging.getLogger(__name__)

PYCOCOEVALCAP_DIR = Path(list(pycocoevalcap.__path__)[0])
SPICE_DIR = PYCOCOEVALCAP_DIR / "spice"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_URL = "https://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

# pycocoevalcap's PTB post-processing drops these tokens.
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"}
# Characters the Stanford tokenizer treats as line ends. pycocoevalcap only replaces "\n", so
# any of these would shift every later caption onto the wrong image; COCO's references have none.
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\u2028\u2029"})

_spice_warned = False


# ---------------------------------------------------------------- inputs

def bundled_coco_refs(split: str = "val2014") -> dict:
    """The real COCO 2014 caption annotations that ship inside pycocoevalcap's SPICE jar."""
    name = f"coco/annotations/captions_{split}.json"
    with zipfile.ZipFile(SPICE_DIR / "spice-1.0.jar") as z:
        try:
            return json.loads(z.read(name))
        except KeyError:
            raise UserError(f"split {split!r}: no {name} in {SPICE_DIR / 'spice-1.0.jar'}") from None


# ---------------------------------------------------------------- java scorers

def ptb_tokenize(captions: dict[Any, list[str]], java: str | None = None) -> dict[Any, list[str]]:
    """Stanford PTB tokenization + punctuation removal, token for token as pycocoevalcap's PTBTokenizer."""
    java = java or ensure_java()
    keys = [k for k, caps in captions.items() for _ in caps]
    lines = [c.translate(_LINE_BREAKS) for caps in captions.values() for c in caps]
    jar = PYCOCOEVALCAP_DIR / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_bytes("\n".join(lines).encode())
        proc = subprocess.run([java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", str(path)], capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    out = proc.stdout.decode().split("\n")
    if len(out) < len(lines) or any(out[len(lines):]):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    tokenized: dict[Any, list[str]] = {}
    for k, line in zip(keys, out):
        words = [w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS]
        tokenized.setdefault(k, []).append(" ".join(words))
    return tokenized


@contextlib.contextmanager
def meteor_scorer() -> Iterator[Any]:
    """pycocoevalcap's Meteor, with its java process closed when the block ends, even on error.

    Its java loads a paraphrase table for seconds after it starts: start it early and pass it to
    ``score_captions`` so that the load overlaps other work.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        yield scorer
    finally:
        p = scorer.meteor_p
        p.kill()
        p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            with contextlib.suppress(OSError):
                f.close()
        if scorer.lock.locked():  # an error mid-score leaves it held and Meteor.__del__ would hang
            scorer.lock.release()


def spice_available() -> bool:
    """True when the Stanford CoreNLP 3.6.0 jars SPICE needs are in pycocoevalcap/spice/lib."""
    return all((SPICE_DIR / "lib" / jar).is_file() for jar in CORENLP_JARS)


def _spice_missing_message() -> str:
    return (f"SPICE needs {' and '.join(CORENLP_JARS)} in {SPICE_DIR / 'lib'} "
            f"(both are inside {CORENLP_URL})")


def _spice_java(java: str) -> tuple[str, str | None]:
    """-> (java for SPICE, why it cannot run or None).

    spice-1.0.jar writes its result file through the Nashorn JavaScript engine, removed in
    Java 15, so it needs Java 8-14; CAPTIONING_SPICE_JAVA may name such a ``java``.
    """
    java = os.environ.get("CAPTIONING_SPICE_JAVA") or java
    version = java_version(java)
    if version >= 15 or version == 0:
        return java, (f"SPICE needs Java 8-14 (spice-1.0.jar writes results with Nashorn, removed in Java 15) "
                      f"but {java} is Java {version or '?'}; set CAPTIONING_SPICE_JAVA to a Java 8-14 `java`")
    return java, None


def _spice_cache_dir() -> Path:
    """SPICE caches reference parses (LMDB) here: re-scoring the same references is then fast."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(os.environ.get("CAPTIONING_SPICE_CACHE") or Path(base) / "captioning" / "spice")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _spice(gts: dict[Any, list[str]], res: dict[Any, list[str]], java: str) -> float:
    """SPICE as pycocoevalcap's Spice.compute_score, minus its CoreNLP download."""
    ids = sorted(gts)
    rows = [{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in ids]
    cmd = [java]
    if java_version(java) >= 9:  # FST (the cache's serializer) reflects into java.base
        for pkg in ("java.lang", "java.util", "java.util.concurrent", "java.math", "java.io", "java.net",
                    "java.text"):
            cmd += ["--add-opens", f"java.base/{pkg}=ALL-UNNAMED"]
    with tempfile.TemporaryDirectory(prefix="spice-") as tmp:
        inp, out = Path(tmp) / "input.json", Path(tmp) / "output.json"
        inp.write_text(json.dumps(rows, indent=2))
        cmd += ["-Xmx8G", "-jar", str(SPICE_DIR / "spice-1.0.jar"), str(inp), "-cache", str(_spice_cache_dir()),
                "-out", str(out), "-subset", "-silent"]
        log.info("SPICE: parsing %d images' captions (slow: minutes)", len(ids))
        proc = subprocess.run(cmd, cwd=SPICE_DIR, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"SPICE failed ({proc.returncode}): {proc.stderr[-2000:]}")
        items = json.loads(out.read_text())

    def as_float(x):  # None (no tuples) -> NaN, as pycocoevalcap does
        try:
            return float(x)
        except (TypeError, ValueError):
            return np.nan

    return float(np.mean(np.array([as_float(it["scores"]["All"]["f"]) for it in items])))


# ---------------------------------------------------------------- entry point

def _use_spice(spice: bool | str, java: str) -> str | None:
    """Decide whether SPICE runs: -> the java to run it with, or None (with one warning per process)."""
    global _spice_warned
    if spice not in (True, False, "auto"):
        raise UserError(f"spice: expected true, false or 'auto', got {spice!r}")
    if spice is False:
        return None
    problem = None if spice_available() else _spice_missing_message()
    spice_java = None
    if problem is None:
        spice_java, problem = _spice_java(java)
    if problem is None:
        return spice_java
    if spice is True:
        raise UserError(problem)
    if not _spice_warned:
        log.warning("SPICE not computed (reported as null): %s", problem)
        _spice_warned = True
    return None


def _scored_images(order: list, ref_caps: dict, results) -> tuple[list, dict]:
    """-> (the results' image ids in reference order, {image_id: caption}), or a one-line UserError."""
    src, res_caps = load_results(results)
    known = set(order)
    unknown = [i for i in res_caps if i not in known]
    if unknown:
        raise UserError(f"{src}: image_id {unknown[0]!r} is not in the references"
                        + (f" (nor are {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    ids = [i for i in order if i in res_caps]
    empty = [i for i in ids if not ref_caps.get(i)]
    if empty:
        raise UserError(f"{src}: image_id {empty[0]!r} has no reference captions")
    return ids, res_caps


def score_many(refs: str | os.PathLike | dict, results: list, spice: bool | str = "auto", meteor=None,
               per_image: bool = False) -> list[dict]:
    """``score_captions`` of each entry of ``results`` against the same ``refs``, batched.

    Every caption of every results file goes through one tokenizer run (with -preserveLines each line
    is tokenized on its own, so batching changes no token) and through one METEOR process: scoring
    many variants costs one start-up of each, and each variant's numbers equal a run of its own.
    (SPICE, when it runs, still starts once per results file.)
    """
    order, ref_caps = load_refs(refs)
    checked = [_scored_images(order, ref_caps, r) for r in results]
    if not checked:
        return []
    java = ensure_java()
    spice_java = _use_spice(spice, java)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out = []
    # METEOR's java loads its paraphrase table (seconds) while the tokenizer and BLEU run.
    with contextlib.nullcontext(meteor) if meteor is not None else meteor_scorer() as meteor:
        scored = list(dict.fromkeys(i for ids, _ in checked for i in ids))
        log.info("tokenizing %d images' references and %d results files", len(scored), len(checked))
        tokens = ptb_tokenize({**{("g", i): ref_caps[i] for i in scored},
                               **{("r", n, i): [res_caps[i]] for n, (ids, res_caps) in enumerate(checked)
                                  for i in ids}}, java)
        for n, (ids, _) in enumerate(checked):
            gts = {i: tokens[("g", i)] for i in ids}
            res = {i: tokens[("r", n, i)] for i in ids}
            scores: dict[str, Any] = {}
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            for k, b in enumerate(bleu, 1):
                scores[f"BLEU_{k}"] = float(b)
            scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
            scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
            cider, cider_per_image = Cider().compute_score(gts, res)
            scores["CIDEr"] = float(cider)
            scores["SPICE"] = _spice(gts, res, spice_java) if spice_java else None
            if per_image:
                scores["CIDEr_per_image"] = {i: float(c) for i, c in zip(gts, cider_per_image)}
            out.append(scores)
    return out


def score_captions(refs: str | os.PathLike | dict, results: str | os.PathLike | list,
                   spice: bool | str = "auto", meteor=None, per_image: bool = False) -> dict:
    """BLEU_1-4, METEOR, ROUGE_L, CIDEr (CIDEr-D) and SPICE of ``results`` against ``refs``.

    refs: COCO caption annotations (path or dict); results: COCO results (path or list of
    {"image_id", "caption"}), one per image, every image_id present in refs. Only the images
    in results are scored. spice: "auto" runs it when its jars are installed (else None and a
    warning), True requires it, False skips it. meteor: a running ``meteor_scorer()``, or None
    to start one here. per_image: also return "CIDEr_per_image" {image_id: CIDEr-D}, whose mean
    is "CIDEr" (pycocoevalcap's corpus CIDEr-D is the mean of its per-image scores), for
    confidence intervals by resampling images.
    """
    return score_many(refs, [results], spice=spice, meteor=meteor, per_image=per_image)[0]


def spice_will_run(spice: bool | str = "auto") -> bool:
    """Whether ``score_many(..., spice=spice)`` computes SPICE here (raises as it would for True)."""
    return _use_spice(spice, ensure_java()) is not None
