"""brq-eval's windowing and likelihood bookkeeping (the served path is tested end to end
in test_accuracy_regression.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from vllm_brq import evaluate


def test_windows_are_non_overlapping_and_exact():
    ids = list(range(10))
    assert evaluate.make_windows(ids, 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert evaluate.make_windows(ids, 4, 1) == [[0, 1, 2, 3]]
    with pytest.raises(SystemExit, match="only 2"):
        evaluate.make_windows(ids, 4, 3)
    with pytest.raises(SystemExit, match="fewer than one window"):
        evaluate.make_windows(ids, 20, None)


def test_window_nll_skips_the_first_position_and_reads_the_prompt_token():
    tokens = [5, 7, 9]
    lp = [None, {7: SimpleNamespace(logprob=math.log(0.5)), 1: SimpleNamespace(logprob=-0.1)},
          {9: SimpleNamespace(logprob=math.log(0.25))}]
    assert evaluate.window_nll(lp, tokens) == pytest.approx(math.log(2) + math.log(4))


def test_missing_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.load_text(str(tmp_path / "nope.txt"))
