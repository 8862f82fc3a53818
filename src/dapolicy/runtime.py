"""Process-wide runtime settings that library calls must leave as they found them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` torch CPU threads (None = unchanged), then restore the previous count.

    On a shared 2-core machine torch's OpenMP threads stall badly when another job loads the cores, so every
    command takes a `--threads` and evaluation defaults to one thread per process.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
