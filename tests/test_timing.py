"""Model-work timing: what benchmarks/rules.py sets against each job's wall time."""
import json
import time

from captioning import timing


def test_nested_model_work_counts_once():
    @timing.model_work
    def inner():
        time.sleep(0.05)

    @timing.model_work
    def outer():
        inner()
        time.sleep(0.05)

    before = timing.model_seconds()
    outer()
    spent = timing.model_seconds() - before
    assert 0.1 <= spent < 0.25  # once, however loaded the machine: twice would be at least 0.15


def test_failed_model_work_still_counts_and_line_is_json():
    @timing.model_work
    def boom():
        time.sleep(0.02)
        raise ValueError

    before = timing.model_seconds()
    try:
        boom()
    except ValueError:
        pass
    assert timing.model_seconds() - before >= 0.02
    line = timing.timing_line("train", 1.23456)
    assert line.startswith(timing.TIMING_PREFIX)
    assert json.loads(line.removeprefix(timing.TIMING_PREFIX)) == {"verb": "train", "model_seconds": 1.235}
