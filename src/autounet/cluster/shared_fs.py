"""The one requirement of a cluster run: every node sees the same files.

The driver writes a random token into the folder the workers will write (the workspace, or
predict's output folder) and a task pinned to each live node reads it back, together with the
paths the workers will read (the raw dataset, the model, the inputs). A node that cannot
refuses the run before any work is scheduled, naming the node and the path.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from autounet.cluster.session import alive_nodes, node_label
from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write_text, make_folder
from autounet.workspace import shared_check_path

ANSWER_TIMEOUT_S = 300.0  # a node busy starting workers (or pulling a container) may take a while


def read_token(path: str, readable: Sequence[str]) -> tuple[str, str | None, list[str]]:
    """On a node: its host name, the token's text (None if it cannot be read) and which of
    ``readable`` it does not see."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        text = None
    return socket.gethostname(), text, [p for p in readable if not Path(p).exists()]


def check_shared(ray: ModuleType, folder: Path, readable: Sequence[Path] = (), what: str = "the workspace") -> None:
    """Refuse (one :class:`AutounetError` naming every node and path) unless every live node
    reads the token written into ``folder`` and sees every path of ``readable``."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    made = [p for p in (folder, *folder.parents) if not p.exists()]
    make_folder(folder)
    token = secrets.token_hex(8)
    path = shared_check_path(folder, token)
    atomic_write_text(path, token)
    try:
        nodes = alive_nodes(ray)
        task = ray.remote(read_token)
        refs = [
            task.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
            ).remote(str(path), [str(p) for p in readable])
            for n in nodes
        ]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ANSWER_TIMEOUT_S)
        problems = []
        for node, ref in zip(nodes, refs):
            if ref not in ready:
                problems.append(f"{node_label(node)}: did not answer within {ANSWER_TIMEOUT_S:g} s")
                continue
            try:
                _, text, unseen = ray.get(ref)
            except ray.exceptions.RayError as exc:
                problems.append(f"{node_label(node)}: could not run the check ({type(exc).__name__})")
                continue
            if text != token:
                state = "does not see" if text is None else "reads another file at"
                problems.append(f"{node_label(node)} {state} {path}")
            problems += [f"{node_label(node)} does not see {p}" for p in unseen]
    finally:
        path.unlink(missing_ok=True)
    if problems:
        for folder_made in made:  # only the empty folders this check created
            try:
                folder_made.rmdir()
            except OSError:
                break
        raise AutounetError(
            f"{what} ({folder}) must be on a file system that every node of the Ray cluster sees (NFS, a shared "
            "volume, ...):\n  " + "\n  ".join(problems)
        )
