"""What the driver of a cluster run shows: one line per task as it starts, finishes or fails
(with its node), and an overall bar on standard error (:mod:`autounet.utils.progress`)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from autounet.utils.progress import progress_bar


class EventBoard:
    """A Ray actor the tasks post their events to (``{"label", "event", "node", "pid"}``); the
    driver takes them while it waits for the tasks."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def take(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events


def start_board(ray: ModuleType) -> Any:
    """A new :class:`EventBoard` actor (it takes no CPU from the tasks)."""
    return ray.remote(num_cpus=0)(EventBoard).remote()


class TaskProgress:
    """Lines on standard output and a bar of finished tasks on standard error."""

    def __init__(self, total: int, desc: str, unit: str):
        self.bar = progress_bar(total=total, desc=desc, unit=unit)

    def line(self, text: str) -> None:
        self.bar.clear()
        print(text, flush=True)
        self.bar.refresh()

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
