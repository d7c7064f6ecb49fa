"""The CPU allocator setting: tensors below the threshold come from glibc's heap instead of fresh mappings."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, torch
from kdflow.runtime import malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_while_held(nbytes):
    before = libc.mallinfo2().hblkhd  # bytes in blocks glibc mapped with mmap
    t = torch.empty(nbytes, dtype=torch.uint8)
    during = libc.mallinfo2().hblkhd
    del t
    return during - before

print(mapped_while_held(4 << 20), malloc.keep_freed_blocks(), mapped_while_held(4 << 20), mapped_while_held(64 << 20))
"""


def _glibc_with_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_blocks_under_the_threshold_come_from_the_heap():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    default, took, tuned, huge = out.stdout.split()
    assert int(default) >= 4 << 20  # glibc's default: a 4 MiB tensor gets its own mapping
    assert took == "True"
    assert int(tuned) == 0  # now it comes from the heap (and its memory is reused once freed)
    assert int(huge) >= 64 << 20  # above the 32 MiB threshold blocks are still mapped
