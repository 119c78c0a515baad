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


BOARD_RESTARTS = -1  # a board whose process dies is restarted (empty) as often as it takes
BOARD_ANSWER_S = 10.0  # how long the driver waits for the board's events before it polls again


def board_options(ray: ModuleType) -> dict[str, Any]:
    """How the board actor runs: no CPU taken from the tasks, pinned to the driver's node (which
    the run cannot outlive anyway) and restarted if its process dies, its calls retried."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return dict(
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        max_restarts=BOARD_RESTARTS,
        max_task_retries=-1,
    )


def start_board(ray: ModuleType) -> Any:
    """A new :class:`EventBoard` actor (see :func:`board_options`)."""
    return ray.remote(EventBoard).options(**board_options(ray)).remote()


def take_events(ray: ModuleType, board: Any) -> list[dict[str, Any]]:
    """The events posted since the last call; none (not an error) while the board is lost or
    restarting: the lines are only what the driver shows, the tasks go on without them."""
    try:
        return ray.get(board.take.remote(), timeout=BOARD_ANSWER_S)
    except (ray.exceptions.RayError, TimeoutError):
        return []


def stop_board(ray: ModuleType, board: Any) -> None:
    """End the board (already gone: nothing to do)."""
    try:
        ray.kill(board, no_restart=True)
    except Exception:  # a lost actor or cluster is what this tolerates
        pass


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
