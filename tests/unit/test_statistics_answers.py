"""The node checks a statistics child's answer like a training answer (issue 19): a child that
reads the data may run code the node does not trust (a loader's bug, a poisoned file), so what
it sends back must fit the request and the site's policy before a researcher sees it."""

from __future__ import annotations

import pytest

from node.answers import AnswerRefused, check_statistics
from node.policy import StatisticsPolicy

GOOD = {"ok": True, "n": 40, "sum": [1.0, 2.0], "sumsq": [3.0, 4.0], "hist": [[0, 5, 35], [40, 0, 0]],
        "suppressed_cells": 1}


def _check(answer, bins=3, policy=None):
    return check_statistics(answer, bins=bins, min_rows=10, max_rows=40, policy=policy or StatisticsPolicy())


def test_a_fitting_answer_passes():
    assert _check(GOOD)["n"] == 40


@pytest.mark.parametrize("bad, why", [
    ({"n": 41}, "n must be an int"),
    ({"n": 3}, "n must be an int"),
    ({"sum": [1.0, float("nan")]}, "not a finite number"),
    ({"sumsq": [3.0]}, "sumsq must be a list of 2"),
    ({"sumsq": [3.0, -1.0]}, "negative"),
    ({"min": [0.0, 0.0], "max": [9.0, 9.0]}, "extremes this site does not send"),
    ({"hist": [[0, 2, 38], [40, 0, 0]]}, "was not suppressed"),
    ({"hist": [[0, 40], [40, 0]]}, "3 counts"),
    ({"rows": [[1, 2]]}, "unknown fields"),
])
def test_an_answer_that_does_not_fit_is_refused(bad, why):
    with pytest.raises(AnswerRefused, match=why):
        _check({**GOOD, **bad})


def test_extremes_pass_when_the_site_allows_them():
    assert _check({**GOOD, "min": [0.0, 0.0], "max": [9.0, 9.0]}, policy=StatisticsPolicy(extremes="exact"))["max"] == [9.0, 9.0]
