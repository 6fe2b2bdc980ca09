"""Where a model of the registry is on this machine: its `path`, or the path its `source`
package returns (the PyPI model packages mesh uses by default ship a callable that says).
"""

from __future__ import annotations

import importlib
import os

from mesh.models import ModelError, ModelSpec


def resolve_path(name: str, spec: ModelSpec) -> str:
    """The model's file or directory on disk; raises ModelError with what to do."""
    if spec.path:
        path = os.path.expanduser(spec.path)
    elif spec.source:
        module, _, attr = spec.source.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr or "get_model_path")
        except ImportError as exc:
            raise ModelError(
                f"model {name!r}: cannot import {module!r} ({exc}); install the model stack with "
                f"`make models` (or pip install 'mesh[models]'), or set models.{name}.path"
            ) from exc
        except AttributeError as exc:
            raise ModelError(
                f"model {name!r}: {module!r} has no {attr!r}; check models.{name}.source"
            ) from exc
        path = str(fn())
    else:
        raise ModelError(f"model {name!r} has neither path nor source; set one in the config")
    if not os.path.exists(path):
        raise ModelError(f"model {name!r}: {path} does not exist; check models.{name}.path")
    return path
