"""How much of a job's time is model work, so the benchmark can tell it from start-up and scoring.

Model work is encoding images, training steps with their validation, compressing weights and
captioning. Functions that do it are decorated with ``model_work``; the CLI prints the total as its
last log line (``TIMING_PREFIX`` + JSON), and ``benchmarks/rules.py`` sets it against each job's wall
time. Nested decorated calls count once.
"""
from __future__ import annotations

import functools
import json
import time

TIMING_PREFIX = "captioning timing: "

_seconds = 0.0
_depth = 0


def model_work(fn):
    """Count the wall time of ``fn`` as model work (once, however deeply such calls nest)."""

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        global _seconds, _depth
        _depth += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _depth -= 1
            if _depth == 0:
                _seconds += time.perf_counter() - start

    return timed


def model_seconds() -> float:
    return _seconds


def timing_line(verb: str, seconds: float) -> str:
    """The log line the benchmark reads: a verb's model work in seconds."""
    return TIMING_PREFIX + json.dumps({"verb": verb, "model_seconds": round(seconds, 3)})
