"""The training commands' malloc settings (tapestry/allocator.py) take effect on this platform."""

import platform
import sys

import pytest

from tapestry.allocator import SETTINGS, M_MMAP_THRESHOLD, keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt settings are glibc's")
def test_glibc_accepts_every_setting():
    # mallopt answers 0 for a setting it refuses, and the function then says False: on glibc,
    # every setting must be taken (the training commands rely on it for their speed)
    assert SETTINGS[M_MMAP_THRESHOLD] >= 4 << 20  # above a [4, 1024, 192] float32 tensor
    assert keep_freed_memory() is True
