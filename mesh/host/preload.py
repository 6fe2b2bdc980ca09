"""Native model libraries a GPU worker loads before anything else.

A llama-cpp-python built with CUDA can carry its own copy of the C++ runtime inside
`libggml-cuda` and export it. When the system's `libstdc++` is already loaded (on that host
it was, once `nats` had been imported), llama.cpp's C++ calls bind half to one copy and half
to the other, and the process dies with SIGSEGV in `llama_model::print_info` at the first
model load. Seen on an H100 host (llama-cpp-python 0.3.36 built with nvcc 13.0): the worker
crashed silently in `booting_llm`, while the same load in a plain script worked. Loading
llama.cpp first makes its copy the one everything binds to.

So a GPU worker (`mesh agent worker --gpu N`) imports `llama_cpp` before the rest of mesh,
when it is installed. `MESH_PRELOAD=0` turns this off.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence


def is_gpu_worker(argv: Sequence[str]) -> bool:
    """Whether the command line runs `agent worker` with a GPU index."""
    args = list(argv[1:])
    try:
        at = args.index("agent")
    except ValueError:
        return False
    if args[at + 1 : at + 2] != ["worker"]:
        return False
    rest = args[at + 2 :]
    for i, arg in enumerate(rest):
        value = arg.split("=", 1)[1] if arg.startswith("--gpu=") else ""
        if arg == "--gpu" and i + 1 < len(rest):
            value = rest[i + 1]
        if value:
            return value.strip().lower() not in ("none", "cpu", "")
    return False


def preload(argv: Sequence[str]) -> list[str]:
    """Import the native model libraries a GPU worker needs first; the names imported."""
    if os.environ.get("MESH_PRELOAD", "1") == "0" or not is_gpu_worker(argv):
        return []
    loaded = []
    for name in ("llama_cpp",):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception:  # the worker reports a broken library when it loads a model
            continue
        loaded.append(name)
    return loaded
