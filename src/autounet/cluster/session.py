"""Starting or joining Ray for one command, and what the driver asks it about its nodes."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from autounet.errors import AutounetError

RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install autounet[ray]"
PROBE_TIMEOUT_S = 10.0  # ray.init retries an unreachable address forever: we ask first, this long


def import_ray() -> ModuleType:
    """The ``ray`` module, or one clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise AutounetError(RAY_MISSING) from None
    return ray


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT``, ``[IPv6]:PORT`` or ``ray://HOST:PORT``; one clear error otherwise."""
    text = address.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AutounetError(f"--address {address}: expected 'auto' or HOST:PORT of a running Ray cluster's head")
    return host, int(port)


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse (one :class:`AutounetError` naming it) an address where nothing accepts a connection
    within ``timeout`` seconds. ``auto`` means ``RAY_ADDRESS`` when that is set (probed as well),
    else a cluster started on this machine, which Ray finds (or fails to find) at once."""
    named = f"--address {address}"
    if address.strip() == "auto":
        address = os.environ.get("RAY_ADDRESS", "").strip()
        if address in ("", "auto", "local"):
            return
        named += f" (RAY_ADDRESS={address})"
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    why = f"nothing answered within {timeout:g} s"
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        found, why = [], f"unknown host: {exc.strerror or exc}"
    for family, kind, proto, _, where in found:  # each of the host's addresses, within one deadline
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(left)
            try:
                probe.connect(where)
                return
            except TimeoutError:
                why = f"nothing answered within {timeout:g} s"
            except OSError as exc:
                why = exc.strerror or str(exc)
    raise AutounetError(
        f"{named}: cannot reach a Ray cluster there ({why}); start it with `ray start --head` on that machine, or "
        "leave out --address for a local instance"
    )


@contextmanager
def ray_session(address: str | None) -> Iterator[ModuleType]:
    """Ray for the length of a command: without ``address`` a local instance (the CPUs Ray itself
    detects, which respects container limits; every GPU; no dashboard, quiet), with ``address``
    (``auto`` or ``HOST:PORT``, first probed: :func:`probe_address`) the running cluster there.
    A connection this process already holds (Python API: ``ray.init(num_cpus=...)`` before the
    call sets the local instance's size) is used as it is and left open."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    try:
        if address is None:
            import torch

            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, **quiet)
        else:
            probe_address(address)
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
