"""Logging setup for entry points: level, format, and which agent a line comes from.

Only entry points call this; the library only asks `logging.getLogger`.
"""

from __future__ import annotations

import logging
import os
import sys


def configure(level: str | None = None, *, name: str = "") -> None:
    level = (level or os.environ.get("MESH_LOG_LEVEL") or "INFO").upper()
    fmt = "%(asctime)s %(levelname)-7s " + (f"{name} " if name else "") + "%(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # nats-py logs every reconnect attempt at error level; ours say what matters
    logging.getLogger("nats").setLevel(logging.CRITICAL)
