"""GloBE: global basis banks that compress the experts of Mixture-of-Experts models.

    import globe
    cfg = globe.GlobeConfig(r="p/2", m="n/4")
    fit = globe.fit_bank(W, cfg)                       # W [N, p, d]: one family's experts in one scope
    art = globe.compress("path/to/checkpoint", "out/", cfg)
    art = globe.load_artifact("out/"); W_hat = art.reconstruct("gate", layer)

Importing the package is light: the names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GlobeConfig": "globe.config",
    "ConfigError": "globe.errors",
    "GlobeError": "globe.errors",
    "ArtifactError": "globe.errors",
    "CheckpointError": "globe.errors",
    "fit_bank": "globe.am",
    "FitResult": "globe.am",
    "compress": "globe.compress",
    "load_artifact": "globe.artifact",
    "Artifact": "globe.artifact",
    "Normalization": "globe.normalize",
    "patch_model": "globe.inference",
    "unpatch_model": "globe.inference",
    "memory_report": "globe.inference",
    "save_compressed": "globe.inference",
    "load_compressed": "globe.inference",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from globe.am import FitResult, fit_bank  # noqa: F401
    from globe.artifact import Artifact, load_artifact  # noqa: F401
    from globe.compress import compress  # noqa: F401
    from globe.config import GlobeConfig  # noqa: F401
    from globe.errors import ArtifactError, CheckpointError, ConfigError, GlobeError  # noqa: F401
    from globe.inference import (  # noqa: F401
        load_compressed,
        memory_report,
        patch_model,
        save_compressed,
        unpatch_model,
    )
    from globe.normalize import Normalization  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'globe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
