"""``python -m torch.distributed.run ... -m autounet.cluster.torchrun_fold WORK NAME CONFIG FOLD
OPTIONS_JSON``: one fold of a cluster run brought to ``done`` by every rank of a torchrun job
(DDP training, then validation on rank 0), with the run's options as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from autounet.errors import AutounetError
from autounet.pipeline.run import RunOptions, train_fold
from autounet.workspace import Workspace


def main(argv: list[str]) -> int:
    work, name, configuration, fold, options_json = argv
    options = RunOptions(**json.loads(options_json))
    try:
        train_fold(Workspace(Path(work), name), configuration, int(fold) if fold.isdigit() else fold, options)
    except AutounetError as exc:
        print(f"{configuration} fold {fold}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
