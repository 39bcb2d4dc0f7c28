"""The action list (nDriver): resources a driver took, undone in reverse order on rollback.

The framework records every resource it hands a driver (a claimed interface, a detached
kernel driver, a started datapath with its transfers, DMA mappings) together with the call
that gives it back. Rolling back to a mark undoes, newest first, whatever was taken since.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("udrv.actions")


@dataclass
class Action:
    what: str
    undo: Callable[[], None]
    id: int = 0


class ActionList:
    def __init__(self) -> None:
        self._live: list[Action] = []
        self._next = 1

    def record(self, what: str, undo: Callable[[], None]) -> Action:
        a = Action(what, undo, self._next)
        self._next += 1
        self._live.append(a)
        return a

    def released(self, action: Action) -> None:
        """The resource was given back normally; forget it."""
        try:
            self._live.remove(action)
        except ValueError:
            pass

    def mark(self) -> int:
        return self._next

    def rollback(self, mark: int) -> list[str]:
        """Undo every live action taken at or after `mark`, newest first."""
        undone: list[str] = []
        for a in reversed([a for a in self._live if a.id >= mark]):
            self._live.remove(a)
            try:
                a.undo()
            except Exception as e:  # the device may be gone: keep undoing the rest
                log.warning("undo of %s failed: %s", a.what, e)
            undone.append(a.what)
        return undone

    def release_all(self) -> list[str]:
        return self.rollback(0)

    def live(self) -> list[str]:
        return [a.what for a in self._live]

    def __len__(self) -> int:
        return len(self._live)
