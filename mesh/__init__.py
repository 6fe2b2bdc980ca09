"""mesh: run plans of local AI work across the GPUs of your own machines, over NATS JetStream.

The layers and the job of each module: docs/architecture.md, "The module map".
"""

__version__ = "0.1.0"

# A GPU worker loads its native model libraries before anything else (see mesh/host/preload.py).
import sys as _sys

from mesh.host.preload import preload as _preload

_preload(_sys.argv)
