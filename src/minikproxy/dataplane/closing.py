"""A base for dataplane handles that own a kernel resource (a socket, a library context, a
thread) and release it in ``close()``: ``with Handle(...) as h:`` closes it on the way out."""

from __future__ import annotations

from typing import Self


class Closing:
    """Context-manager protocol for classes that define ``close()``."""

    def close(self) -> None:
        """Release what the handle owns; idempotent."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
