"""Progress bars: tqdm's, without its monitor thread, closed when their loop ends or fails.

tqdm starts a monitor thread (``TMonitor``, which only lowers the refresh rate of a bar that stalls) with the
first bar it makes, even a disabled one, and registers an atexit handler for it: Ctrl-C pressed while the
interpreter exits after a finished command printed a traceback from there. ``monitor_interval = 0``, tqdm's
documented switch, turns the thread off for finescope's bars only (not for the bars of the caller's own code).
"""

from __future__ import annotations

from tqdm.auto import tqdm


class Progress(tqdm):
    """``tqdm.auto.tqdm`` without the monitor thread. Use it as a context manager (``with Progress(loader) as
    batches: for batch in batches: ...``): the bar is closed when the loop ends, breaks or raises, not when the
    garbage collector gets to it."""

    monitor_interval = 0


__all__ = ["Progress"]
