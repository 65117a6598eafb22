"""Small helpers shared by the client and the batch runner."""

from __future__ import annotations

import anyio

__all__ = ["single_error"]


def single_error(
    group: BaseExceptionGroup[BaseException], prefer: BaseException | None = None
) -> BaseException | None:
    """The one real error inside a task group's exception group, if there is exactly one.

    Cancellations are ignored. Users should see ``KeyError`` raised in their ``async with``
    body as a ``KeyError``, not as an ``ExceptionGroup`` of one (aiometer does the same).
    """
    cancelled = anyio.get_cancelled_exc_class()
    leaves: list[BaseException] = []

    def walk(eg: BaseExceptionGroup[BaseException]) -> None:
        for e in eg.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            elif not isinstance(e, cancelled):
                leaves.append(e)

    walk(group)
    if prefer is not None and all(e is prefer for e in leaves):
        return prefer
    if len(leaves) == 1:
        return leaves[0]
    return None
