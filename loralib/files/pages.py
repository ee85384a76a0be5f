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
