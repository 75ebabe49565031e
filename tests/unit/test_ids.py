"""Run ids sort by creation, also within one millisecond."""

from __future__ import annotations

import threading
import time

from ondeck.ids import _ALPHABET, new_id


def _millis(identifier: str) -> int:
    value = 0
    for char in identifier[:10]:
        value = value * 32 + _ALPHABET.index(char)
    return value  # 10 characters are 50 bits, of which the top 2 are zero: the 48 of time


def test_ids_made_in_a_burst_sort_in_the_order_they_were_made() -> None:
    before = int(time.time() * 1000)
    made = [new_id() for _ in range(20_000)]  # many share a millisecond
    after = int(time.time() * 1000)
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(len(i) == 26 for i in made)
    assert before <= _millis(made[0]) and _millis(made[-1]) <= after + 1


def test_ids_made_on_several_threads_are_unique_and_each_threads_ascend() -> None:
    made: list[list[str]] = [[] for _ in range(4)]

    def make(into: list[str]) -> None:
        into.extend(new_id() for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(ids == sorted(ids) for ids in made)
    assert len({i for ids in made for i in ids}) == 20_000
