"""tests/support.py's wait_until: what a reader of a failing test gets, on either clock."""
from __future__ import annotations

import threading

import pytest
import trio

from support import wait_until, wait_until_sync


async def test_returns_the_first_truthy_value_of_a_plain_or_async_predicate(autojump_clock):
    polls = []

    def plain():
        polls.append(trio.current_time())
        return len(polls) == 3 and {"ready": True}

    assert await wait_until(plain, "three polls") == {"ready": True}
    assert polls[-1] - polls[0] == pytest.approx(0.02)   # one interval (0.01 s) apart

    async def asynchronous():
        await trio.sleep(1)
        return "done"

    assert await wait_until(asynchronous, "an async predicate") == "done"


async def test_times_out_on_trios_clock_naming_what_it_waited_for(autojump_clock):
    start = trio.current_time()
    with pytest.raises(AssertionError, match=r"timed out after 30 s waiting until the moon "
                                             r"rises \(last value: 0\)"):
        await wait_until(lambda: 0, "the moon rises", timeout=30)
    assert trio.current_time() - start == pytest.approx(30)   # virtual: no real time spent


async def test_an_async_predicate_stuck_past_the_timeout_is_cancelled(autojump_clock):
    async def never():
        await trio.sleep_forever()

    with pytest.raises(AssertionError, match="waiting until it answers$"):
        await wait_until(never, "it answers", timeout=5)


def test_the_sync_variant_polls_plain_code():
    flag = threading.Event()
    threading.Timer(0.05, flag.set).start()
    assert wait_until_sync(flag.is_set, "the timer fires", timeout=10, interval=0.01)
    with pytest.raises(AssertionError, match="timed out after 0.05 s waiting until never"):
        wait_until_sync(lambda: False, "never", timeout=0.05, interval=0.01)
