"""Starting or joining Ray for one command, and what the driver asks it about its nodes."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from autounet.errors import AutounetError

RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install autounet[ray]"


def import_ray() -> ModuleType:
    """The ``ray`` module, or one clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise AutounetError(RAY_MISSING) from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[ModuleType]:
    """Ray for the length of a command: without ``address`` a local instance sized to this
    machine (every core and GPU, no dashboard, quiet), with ``address`` (``auto`` or
    ``HOST:PORT``) the running cluster there. A connection this process already holds (Python
    API) is used as it is and left open."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    try:
        if address is None:
            import torch

            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(
                num_cpus=os.cpu_count() or 1,
                num_gpus=torch.cuda.device_count(),
                include_dashboard=False,
                **quiet,
            )
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f"join the Ray cluster at {address}" if address else "start Ray on this machine"
        hint = " (start it with `ray start --head`, or leave out --address for a local instance)" if address else ""
        raise AutounetError(f"could not {where}: {exc}{hint}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def alive_nodes(ray: ModuleType) -> list[dict[str, Any]]:
    """The cluster's live nodes as ``ray.nodes()`` describes them."""
    return [n for n in ray.nodes() if n.get("Alive")]


def node_label(node: dict[str, Any]) -> str:
    """``hostname (ip)`` of a node from ``ray.nodes()``."""
    return f"{node.get('NodeManagerHostname', '?')} ({node.get('NodeManagerAddress', '?')})"


def this_node() -> str:
    """``hostname (ip)`` of the machine this code runs on (inside a task: the worker's node)."""
    try:
        from ray.util import get_node_ip_address

        ip = get_node_ip_address()
    except Exception:  # outside Ray, or no address: the name alone still says where
        ip = "?"
    return f"{socket.gethostname()} ({ip})"


def cluster_gpus(ray: ModuleType) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def check_room(ray: ModuleType, cpus: float, gpus: float, what: str) -> int:
    """Refuse a task no live node has room for (it would wait forever); returns how many such
    tasks the cluster runs at once."""
    nodes = alive_nodes(ray)
    slots = 0
    for node in nodes:
        have = node.get("Resources", {})
        fit_cpu = int(have.get("CPU", 0) // cpus) if cpus else 1 << 30
        fit_gpu = int(have.get("GPU", 0) // gpus) if gpus else 1 << 30
        slots += min(fit_cpu, fit_gpu)
    if slots == 0:
        largest = ", ".join(
            f"{node_label(n)}: {n.get('Resources', {}).get('CPU', 0):g} CPU(s), {n.get('Resources', {}).get('GPU', 0):g} GPU(s)"
            for n in nodes
        )
        raise AutounetError(
            f"no node of the Ray cluster has room for {what} ({cpus:g} CPU(s) and {gpus:g} GPU(s)); the nodes: "
            f"{largest or 'none alive'}"
        )
    return slots
