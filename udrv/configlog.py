"""The configuration log (shadow drivers): what the host asked for, replayable.

Only the latest call of each kind matters (setting the MAC twice leaves one MAC), so the log
keeps one entry per entry point, in first-seen order. After a restart or a swap to another
implementation the supervisor replays it into the fresh driver.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoggedCall:
    entry: str
    args: tuple[Any, ...]


class ConfigLog:
    def __init__(self) -> None:
        self._calls: dict[str, LoggedCall] = {}

    def record(self, entry: str, *args: Any) -> None:
        self._calls[entry] = LoggedCall(entry, args)

    def forget(self, entry: str) -> None:
        self._calls.pop(entry, None)

    def calls(self) -> list[LoggedCall]:
        """Replay order: settings first, bringing the interface up last (open reads them)."""
        return sorted(self._calls.values(), key=lambda c: c.entry == "open")

    def get(self, entry: str) -> LoggedCall | None:
        return self._calls.get(entry)

    def __len__(self) -> int:
        return len(self._calls)
