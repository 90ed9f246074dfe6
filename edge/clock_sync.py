"""Is the wall clock synchronised? The kernel knows: ``adjtimex(2)`` with no changes requested.

A Pi has no real-time clock: until NTP (systemd-timesyncd, chrony) has set
it, its clock continues from whenever it was last saved, often hours or
days behind. The kernel marks the clock unsynchronised (``TIME_ERROR``,
``STA_UNSYNC``) until a time daemon disciplines it. The edge puts the answer
in every pulse message (``synced``), so the writer does not trust times a
Pi itself doubts. Example::

    >>> synced_from(state=TIME_OK, status=0)
    True
    >>> synced_from(state=TIME_ERROR, status=STA_UNSYNC)
    False
"""

from __future__ import annotations

import ctypes
import ctypes.util

TIME_OK = 0
TIME_ERROR = 5
STA_UNSYNC = 0x0040


class _Timex(ctypes.Structure):
    """``struct timex`` of <sys/timex.h> (Linux), up to the padding the kernel reserves."""

    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("padding", ctypes.c_int * 11),
    ]


def synced_from(state: int, status: int) -> bool:
    """The kernel's clock state and status bits, read as synchronised or not."""
    return state != TIME_ERROR and not status & STA_UNSYNC


def describe_sync(synced: bool | None) -> str:
    """For log and status lines, which put it after "the clock is", "clock:" or in parentheses.

    >>> f"the clock is {describe_sync(None)}"
    'the clock is not known to be synchronised'
    """
    if synced is None:
        return "not known to be synchronised"
    return "synchronised" if synced else "NOT synchronised (check timedatectl: is NTP running?)"


def kernel_clock_synced() -> bool | None:
    """True or False as the kernel says, or None where it cannot be asked (not Linux, no libc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        adjtimex = ctypes.CDLL(name, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    timex = _Timex()  # modes = 0: read only
    state = adjtimex(ctypes.byref(timex))
    if state < 0:
        return None
    return synced_from(state, timex.status)
