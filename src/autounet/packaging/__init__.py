"""Model packages: one zip holding everything `predict` needs (`autounet package`), opened with
verification into a cache (`predict -m FILE.zip`), and `autounet info` about a model.

``create`` writes a package from a workspace; ``open`` verifies one and unpacks it once;
``manifest`` is its typed ``manifest.json``; ``contents`` the fingerprint summary a package carries
instead of the per-case fingerprint; ``info`` describes a package or a workspace.
"""

from __future__ import annotations

from autounet.packaging.open import open_package

__all__ = ["open_package"]
