"""Giving this process's freed memory back to the system after a big burst of allocations.

A million-task acceptance or load allocates hundreds of MB that live for a moment (events,
their encodings, the messages read) among the records that stay. The C allocator keeps what is
freed for the next allocation; `malloc_trim` hands the free pages back (glibc only: elsewhere
this does nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    return trim


def give_back() -> bool:
    """Hand the free pages of the C heap back to the system; whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
