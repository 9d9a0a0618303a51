"""A worker's frames in flight, and how many of them outlived a worker's death already (admission's pick)."""
from __future__ import annotations

from typing import Any


class InFlight(dict[int, Any]):
    """A worker's frames in flight (seq -> Frame), counting those that outlived a worker's death already.

    Admission asks `suspects` at every pick (a worker holding one takes no other frame); counting on
    the way in and out keeps that pick from scanning the frames. A frame's `deaths` only grows while
    it is out of every worker's hands (between an exit and its requeue).
    """

    __slots__ = ("suspects",)

    def __init__(self) -> None:
        super().__init__()
        self.suspects = 0

    def __setitem__(self, seq: int, frame: Any) -> None:
        old = super().get(seq)
        if old is not None and old.deaths:
            self.suspects -= 1
        super().__setitem__(seq, frame)
        if frame.deaths:
            self.suspects += 1

    def pop(self, seq: int, default: Any = None) -> Any:
        frame = super().pop(seq, default)
        if frame is not default and frame.deaths:
            self.suspects -= 1
        return frame

    def __delitem__(self, seq: int) -> None:
        self.pop(seq)

    def clear(self) -> None:
        super().clear()
        self.suspects = 0
