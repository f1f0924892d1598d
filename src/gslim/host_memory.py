"""Keep the host memory of large tensors in the process instead of giving it back each time.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
unmaps it on ``free``; the kernel then zeroes each new page on first touch. A CNN's activations
at 224 px and batch 64 are ~100 MB each, so every forward pass maps, faults in, zeroes and unmaps
them again: on a 2-core VM a MobileNetV2 forward over 256 images took 8.2 s, most of it in the
kernel; with the blocks kept, 3.8 s (``benchmarks/host_memory.py``, BENCHMARKS.md "Host memory").

:func:`keep_freed_memory` tells glibc, through ``mallopt``, to serve large blocks from its heap
(``M_MMAP_MAX`` 0) and to keep up to :data:`KEEP_FREE_BYTES` free at the heap's top rather than
trimming it (``M_TRIM_THRESHOLD``). The price is memory: the heap keeps what it grew to, and
blocks of many sizes fragment it. Measured at 224 px on two cores (interleaved, medians of two
rounds): a greedy compress (batch 64) 1.58x faster for MobileNetV2 at 1.02x the peak resident
memory, 1.21x for ResNet-18 at 1.17x, 1.54x for ResNet-50 at 1.22x; 60 SGD steps of MobileNetV2
(batch 32, an evaluation batch of 64 every ten) 1.54x faster at 1.30x the peak, and the process
then *stays* at its peak (1.9x glibc's resident memory between steps). So it is not the default:
the CLI applies it when ``GSLIM_HOST_MEMORY=keep`` is set (:func:`apply_from_environment`), and
library users may call it themselves. Nothing happens outside glibc, or when ``GLIBC_TUNABLES``
already sets malloc parameters (the user chose).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

#: free memory glibc may keep at the top of its heap: the largest value mallopt takes (an int).
#: Smaller values were measured worse (MobileNetV2, 224 px, batch 64, three forwards: 64 MB 8.7
#: million page faults, 256 MB 3.7 million, 1 GiB 0.2 million, glibc's default 18.6 million; its
#: greedy compress with 1 GiB 13.7 s, 1.5 s in the kernel, with this 12.0-13.2 s, 0.8 s, the
#: same as GLIBC_TUNABLES keeping 16 GiB). A free top above it is trimmed and faults again,
#: which is no worse than glibc's default.
KEEP_FREE_BYTES = 2**31 - 1

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

SETTING = "GSLIM_HOST_MEMORY"

#: share of a stage's CPU time spent in the kernel above which the CLI suggests the setting (on
#: the 2-core VM, `gslim compress` of MobileNetV2 at 224 px, 256 images: 0.41 without it and
#: 30.7 s; with it 19.7 s, and ~0.02 in benchmarks/host_memory.py)
HINT_SYSTEM_SHARE = 0.3

_kept = False  # whether this process applied the setting


def apply_from_environment() -> str:
    """:func:`keep_freed_memory` if ``GSLIM_HOST_MEMORY`` is ``keep``; returns what was done
    (``"glibc default"`` when it is unset). Any other value is a mistake, reported as one line."""
    value = os.environ.get(SETTING, "").strip().lower()
    if value in ("", "default"):
        return "glibc default"
    if value != "keep":
        from gslim.errors import GslimError

        raise GslimError(f"{SETTING}={value!r}: expected 'keep' (or 'default', or unset)")
    return keep_freed_memory()


def keep_freed_memory() -> str:
    """Apply the setting when it applies; returns what was done, for logs and tests:
    ``"kept"``, or why not (``"not glibc"``, ``"GLIBC_TUNABLES sets malloc"``,
    ``"mallopt refused"``)."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    libc = _glibc()
    if libc is None:
        return "not glibc"
    # mallopt returns 1 on success, 0 on error
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES) != 1:
        return "mallopt refused"
    global _kept
    _kept = True
    return "kept"


def kernel_time_hint(user_s: float, system_s: float, what: str) -> Optional[str]:
    """A one-line suggestion when ``what`` spent more than HINT_SYSTEM_SHARE of its CPU time in
    the kernel on a glibc system that does not keep freed memory yet; None otherwise."""
    total = user_s + system_s
    if _kept or total <= 0 or system_s / total <= HINT_SYSTEM_SHARE or _glibc() is None:
        return None
    return (
        f"hint: {100 * system_s / total:.0f}% of the {what}'s CPU time was the kernel's (page faults of "
        f"large tensors); GSLIM_HOST_MEMORY=keep may make it faster at the price of memory "
        f"(README, Troubleshooting)"
    )


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it (musl, for one, does not)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc
