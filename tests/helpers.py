"""Helpers shared by test modules."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    check: Callable[[], bool], timeout: float = 15.0, what: str = "", interval: float = 0.02
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds naming ``what``.

    For conditions nothing signals (traffic through the kernel, a controller's sync).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or check}")
