"""autounet: a self-configuring U-Net framework for medical image segmentation.

The Python API mirrors the command line; heavy modules are imported on first use so that
``import autounet`` stays fast.
"""

from __future__ import annotations

import os as _os

# On shared cores (a clinic workstation, a busy node) OpenMP threads that spin while they wait
# steal the cores the other threads need: PyTorch on the CPU ran 3x slower with one competing
# process instead of 2x (docs/explanation/measurements.md, "CPU speed"). Passive waiting, unless
# the user chose; it takes effect when autounet is imported before torch (always so for the
# `autounet` command).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_API = {
    # one function per command (autounet.api)
    "check": "autounet.api",
    "plan": "autounet.api",
    "fingerprint_dataset": "autounet.api",
    "preprocess": "autounet.api",
    "train": "autounet.api",
    "validate": "autounet.api",
    "predict": "autounet.api",
    "evaluate": "autounet.api",
    "export": "autounet.api",
    "package": "autounet.api",
    "info": "autounet.api",
    "show": "autounet.api",
    "select": "autounet.api",
    "postprocess": "autounet.api",
    "report": "autounet.api",
    "run": "autounet.api",
    "demo": "autounet.api",
    "make_synthetic": "autounet.api",
    "Predictor": "autounet.inference.predictor",
    "AutounetError": "autounet.errors",
    "DatasetInvalid": "autounet.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'autounet' has no attribute {name!r}")
