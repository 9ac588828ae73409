"""``Service``: the two ways to run a long-lived trio object, written once.

A subclass implements ``run(*, task_status)``, which calls ``task_status.started(self)``
once it is ready and runs until cancelled, and ``close()``, which makes ``run`` return.
Callers then either ``await nursery.start(obj.run)`` in a nursery they own, or write
``async with obj:``, which opens a private nursery around it.
"""
from __future__ import annotations

import trio


class Service:
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self):
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        try:
            await nursery.start(self.run)
        except BaseException as exc:
            await self._nursery_cm.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        self.close()
        return await self._nursery_cm.__aexit__(*exc_info)
