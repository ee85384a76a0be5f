"""Memory-mapped files whose pages are let go of once read, so that a pass over a large file does
not keep the whole file in this process's memory (resident set). Imports neither torch nor numpy."""

from __future__ import annotations

import mmap

PAGE = mmap.PAGESIZE


def drop_pages(mapped: mmap.mmap, start: int, length: int) -> None:
    """Drop the whole pages inside ``[start, start + length)`` of a file mapping from this process.

    The file and the page cache keep the bytes: touching them again reads them again. A no-op
    where ``madvise`` is not available.
    """
    if not hasattr(mapped, "madvise"):
        return
    first, last = -(-start // PAGE) * PAGE, min(start + length, len(mapped)) // PAGE * PAGE
    if last > first:
        mapped.madvise(mmap.MADV_DONTNEED, first, last - first)


def return_freed_memory() -> None:
    """Give memory that was freed back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Module-by-module computations free their float32 temporaries as they go, but the allocator
    keeps the freed pages of its heaps, so the resident set grows by about a hundred MiB over a
    full-size merge; trimming now and then keeps it at what is really in use."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    global _TRIM
    if _TRIM is False:
        import ctypes

        try:
            _TRIM = ctypes.CDLL(None).malloc_trim  # this process's own symbols, the C library's among them
        except (OSError, AttributeError, TypeError):  # not glibc (or not a Unix)
            _TRIM = None
    return _TRIM


_TRIM = False  # looked up on first use
