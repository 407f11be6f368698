"""When an ahead-of-time compile stops because the program does not fit: what it asked for.

The TPU compiler refuses a program whose temporaries exceed the chip's HBM before it finishes
(in seconds, not minutes), with ``RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total
memory required for HLO temporaries (44.26G) exceeds available HBM (15.75G)``. That figure
is the answer ``flaxlm plan`` is asked for, so the plan reports it (``fits: false``) instead
of exiting with the compiler's error. ``G`` there is GiB: v5e's 16 GiB of HBM less the
runtime's reserve reads ``15.75G``.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# TPU: "... HLO temporaries (44.26G) exceeds available HBM (15.75G)"; a GPU compiler that
# stops on memory says "... allocate N bytes" (the deviceless GPU compile itself finishes and
# plan compares its peak with the GPU's memory instead).
_TEMPORARIES = re.compile(r"HLO temporaries \(([0-9.]+)\s*([KMGT]?)i?B?\)")
_ALLOCATE = re.compile(r"allocate ([0-9]+) bytes")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether a compile error is the compiler saying the program needs more memory."""
    return "RESOURCE_EXHAUSTED" in str(exc)


def asked_bytes(message: str) -> int | None:
    """The temporaries' bytes a RESOURCE_EXHAUSTED message names (None where it names none)."""
    found = _TEMPORARIES.search(message)
    if found:
        return round(float(found.group(1)) * _UNITS[found.group(2)])
    found = _ALLOCATE.search(message)
    return int(found.group(1)) if found else None


def first_line(exc: BaseException) -> str:
    """The compiler's message, one line (its Python traceback and source trace left out)."""
    lines = [line for line in str(exc).strip().splitlines() if "RESOURCE_EXHAUSTED" in line]
    return (lines or str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()
