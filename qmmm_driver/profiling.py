"""Stage labels for torch's profiler (``benchmarks/profile_call.py`` splits a force call by them).

A label costs tens of microseconds even when nobody profiles, so :func:`stage` is a
no-op unless a profiler is running; and it never imports torch (the MM worker
does not load it).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext


def stage(name: str):
    """``torch.profiler.record_function(name)`` while a torch profiler runs, else a context that does nothing."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.autograd.profiler._is_profiler_enabled:
        return nullcontext()
    return torch.profiler.record_function(name)
