"""`autounet predict --executor ray`: the cases sharded over Ray workers.

The driver loads the model once on its CPU to check it and the request (the inputs' names, the
outputs already there: :meth:`Predictor.predict` with ``dry_run``), then starts one task per
share: each loads the model once and predicts the ``i``-th of ``n`` interleaved shares of the
sorted cases still to predict (with ``--continue``, those not complete yet), so the outputs are
the files a local run writes. Each task takes one GPU where the cluster has GPUs (else one CPU);
there are as many shares as fit at once, at most one per case. What each share's engines said
(a fallback to PyTorch, and why) is shown on the driver under the share's name.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

from autounet.cluster.progress import TaskProgress, start_board, stop_board, take_events
from autounet.cluster.session import check_room, cluster_gpus, probe_address, ray_session, this_node
from autounet.cluster.shared_fs import check_shared
from autounet.errors import AutounetError
from autounet.inference.predictor import CaseTiming, Predictor
from autounet.postprocessing.apply import Postprocessing

EVENT_POLL_S = 1.0


def predict_on_ray(
    inputs: Sequence[str | Path],
    output: str | Path,
    model: str | Path,
    predictor_options: dict[str, Any],
    predict_options: dict[str, Any],
    address: str | None,
) -> tuple[list[CaseTiming], Postprocessing | None, list[str]]:
    """Predict ``inputs`` into ``output`` on Ray; returns every case's timing (by name), the
    post-processing applied and the cases found complete (``skip_complete``)."""
    if address is not None:
        probe_address(address)  # before the model is loaded: an unreachable address fails at once
    inputs = [Path(p).resolve() for p in inputs]
    output, model = Path(output).resolve(), Path(model).resolve()
    local = {**predictor_options, "device": "cpu", "engine": "torch", "precision": "auto", "quiet": True}
    checker = Predictor(model, **local)
    todo = checker.predict(inputs, output, **predict_options, dry_run=True)
    skipped = list(checker.skipped)
    if not todo:
        return [], checker.postprocessing, skipped
    with ray_session(address) as ray:
        gpus = min(1, cluster_gpus(ray))
        slots = check_room(ray, 1, gpus, "one prediction share")
        shares = min(slots, len(todo))
        remaining = sorted(t.case_id for t in todo)
        check_shared(ray, output, [model, *inputs], what="the output folder")
        print(f"Ray: {len(todo)} case(s) in {shares} share(s), each on one {'GPU' if gpus else 'CPU'}", flush=True)
        board = start_board(ray)
        task = ray.remote(predict_share).options(num_cpus=1, num_gpus=gpus, max_retries=0)
        refs = {
            task.remote(model, predictor_options, inputs, output, predict_options, remaining[i::shares], i, board): i
            for i in range(shares)
        }
        shown = TaskProgress(shares, "shares", "share")
        timings: list[CaseTiming] = []
        failures: list[str] = []
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=EVENT_POLL_S)
                for event in take_events(ray, board):
                    shown.line(f"  share {event['share'] + 1}/{shares}: started on {event['node']}")
                for ref in done:
                    i = refs[ref]
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
                        result = {"error": f"{type(exc).__name__}: {lines[0] if lines else ''}", "node": "?"}
                    for note in result.get("notes", []):
                        shown.line(f"  share {i + 1}/{shares}: {note}")
                    if result["error"]:
                        failures.append(f"share {i + 1}/{shares} (on {result['node']}): {result['error']}")
                        shown.line(f"  share {i + 1}/{shares}: FAILED on {result['node']}: {result['error']}")
                    else:
                        timings += result["timings"]
                        skipped += result["skipped"]
                        shown.line(
                            f"  share {i + 1}/{shares}: {len(result['timings'])} case(s) on {result['node']} in "
                            f"{result['seconds']:.1f} s"
                        )
                    shown.advance()
        finally:
            shown.close()
            for ref in pending:
                ray.cancel(ref, force=True)
            stop_board(ray, board)
    if failures:
        raise AutounetError(
            f"{len(failures)} of {shares} share(s) failed (the others' outputs are complete; run the same command "
            "with --continue to predict the rest):\n  " + "\n  ".join(failures)
        )
    timings.sort(key=lambda t: t.case_id)
    return timings, checker.postprocessing, sorted(set(skipped))


def predict_share(
    model: Path,
    predictor_options: dict[str, Any],
    inputs: list[Path],
    output: Path,
    predict_options: dict[str, Any],
    cases: list[str],
    share: int,
    board: Any,
) -> dict[str, Any]:
    """Inside a Ray task: load the model once and predict the cases named ``cases``; an error of
    its own is returned (``{"error"}``), not raised. What the engines print (``note: ...``,
    ``networks run on ...``) comes back as ``notes`` for the driver to show."""
    import torch

    started = time.time()
    node = this_node()
    board.post.remote({"share": share, "node": node, "pid": os.getpid()})
    torch.set_num_threads(1)
    options = dict(predictor_options)
    if options.get("device") is None and not torch.cuda.is_available():
        options["device"] = "cpu"
    said = io.StringIO()
    try:
        with redirect_stderr(said):
            predictor = Predictor(model, **options, quiet=False)
            timings = predictor.predict(inputs, output, **predict_options, only=cases)
    except AutounetError as exc:
        return {"error": str(exc), "node": node, "notes": engine_notes(said.getvalue())}
    return {
        "error": None,
        "node": node,
        "notes": engine_notes(said.getvalue()),
        "timings": timings,
        "skipped": list(predictor.skipped),
        "seconds": time.time() - started,
    }


def engine_notes(text: str) -> list[str]:
    """The engines' lines in what a share printed (its progress bars left out), each once."""
    lines = (line.strip() for part in text.splitlines() for line in part.split("\r"))
    wanted = (line for line in lines if line.startswith(("note: ", "networks run on ")))
    return list(dict.fromkeys(wanted))
