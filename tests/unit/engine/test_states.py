from __future__ import annotations

import itertools

import pytest

from ondeck.domain import RunStatus
from ondeck.engine.states import TRANSITIONS, check
from ondeck.errors import IllegalTransition


def test_terminal_states_have_no_way_out() -> None:
    for status in RunStatus:
        if status.terminal:
            assert TRANSITIONS[status] == frozenset()


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (RunStatus.SUCCEEDED, RunStatus.RUNNING),
        (RunStatus.QUEUED, RunStatus.SUCCEEDED),
        (RunStatus.PENDING, RunStatus.RUNNING),
        (None, RunStatus.QUEUED),
    ],
)
def test_illegal_transitions_raise(source: RunStatus | None, target: RunStatus) -> None:
    with pytest.raises(IllegalTransition):
        check(source, target)


def test_the_normal_path_is_legal() -> None:
    path = [None, RunStatus.PENDING, RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.SUCCEEDED]
    for source, target in itertools.pairwise(path):
        check(source, target)
