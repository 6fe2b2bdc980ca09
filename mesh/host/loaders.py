"""Loading a model of the registry onto a device, and freeing it again.

A worker imports this module only when it runs a model kind, and calls
`load_model` in a thread (a load blocks for seconds to minutes). The model
libraries (llama_cpp, faster_whisper, sentence_transformers, torch) are
imported inside the functions that need them, so importing this module costs
nothing.

The device is "cpu" or "cuda". A GPU worker has already narrowed
CUDA_VISIBLE_DEVICES to its own card, so "cuda" is always cuda:0 in here. A
model whose spec says `device = "cpu"` loads on the CPU whatever the worker
asks for.

A worker that owns a set of GPUs lists them all, its first as cuda:0; an LLM
loaded there is split over them (`llm_options`: the spec's `tensor_split`, else
in proportion to each card's free memory, the first card the main GPU).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.host.modelfiles import resolve_path
from mesh.models import ModelError, ModelSpec

INSTALL_HINT = "install the model stack with `make models` (or pip install -e '.[models]')"


@dataclass
class Loaded:
    """A model in memory on one device, ready for its executor."""

    name: str
    spec: ModelSpec
    device: str  # "cpu" or "cuda"
    handle: Any  # llama_cpp.Llama, faster_whisper.WhisperModel or SentenceTransformer
    load_s: float
    # an LLM's llama.cpp options (`llm_options`), to say how it was placed; empty for other kinds
    options: dict[str, Any] = field(default_factory=dict)
    # a handle is not safe to use from two threads at once: executors hold this while they use it
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # an in-process LLM loaded for `llm_slots` above 1: its `mesh.host.llmbatch.Decoder`, which
    # decodes that many tasks together (in a context of its own, without the lock)
    decoder: Any = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def close(self) -> None:
        """Free the model's memory (host and device). Safe to call twice."""
        decoder, self.decoder = self.decoder, None
        if decoder is not None:  # before the model whose weights it decodes with
            decoder.close()
        handle, self.handle = self.handle, None
        if handle is None:
            return
        with self.lock:
            if self.spec.kind == "llm":
                handle.close()
            del handle
            settle_heap()
            if self.spec.kind == "embed" and self.device == "cuda":
                import torch

                torch.cuda.empty_cache()


def effective_device(spec: ModelSpec, device: str) -> str:
    """The device a model loads on: the worker's, unless the spec forces the CPU."""
    if spec.device == "cpu" or device != "cuda":
        return "cpu"
    return "cuda"


def load_model(
    name: str, spec: ModelSpec, device: str, cards_free_mb: Sequence[int] = (), llm_slots: int = 1
) -> Loaded:
    """Load `name` onto `device` ("cpu" or "cuda"); `cards_free_mb`, each card's free memory
    when the worker owns a set of GPUs, spreads an LLM over them; `llm_slots` above 1 gives an
    LLM a decoder of that many sequences (parallel decoding). Blocks; raises ModelError saying
    what to do."""
    if device not in ("cpu", "cuda"):
        raise ModelError(f"model {name!r}: unknown device {device!r} (use 'cpu' or 'cuda')")
    loaders = {"transcribe": _load_whisper, "embed": _load_embedder}
    loader = loaders.get(spec.kind)
    if loader is None and spec.kind != "llm":
        raise ModelError(f"model {name!r}: unknown kind {spec.kind!r} (known: llm, {', '.join(loaders)})")
    path = resolve_path(name, spec)
    dev = effective_device(spec, device)
    options = llm_options(name, spec, dev, cards_free_mb) if spec.kind == "llm" else {}
    began = time.monotonic()
    try:
        handle = loader(name, spec, path, dev) if loader is not None else _load_llm(name, path, dev, options)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model {name!r}: loading {path} on {dev} failed: {type(exc).__name__}: {exc}; "
            f"check that the file is a {_FORMATS[spec.kind]} and that the {dev} has "
            f"{spec.vram_mb or 'enough'} MB free"
        ) from exc
    loaded = Loaded(
        name=name, spec=spec, device=dev, handle=handle, load_s=time.monotonic() - began, options=options
    )
    if spec.kind == "llm" and llm_slots > 1:
        from mesh.host.llmbatch import open_decoder

        try:
            loaded.decoder = open_decoder(loaded, llm_slots)
        except (RuntimeError, ValueError) as exc:
            loaded.close()
            raise ModelError(f"model {name!r}: parallel decoding ({llm_slots} slots) failed: {exc}") from exc
        loaded.load_s = time.monotonic() - began
    settle_heap()
    return loaded


def settle_heap() -> None:
    """Collect what a load or an unload left behind, then freeze what lives on (`gc.freeze`).

    A model in process is hundreds of thousands of Python objects (torch's and transformers'
    modules, the model's layers) that live as long as it does. Without this, each full pass of
    the cyclic collector walks them all, holding the interpreter's lock: 0.25 s in a worker
    with the embedder loaded, during which its event loop and the model's thread both stand
    still (one in each run of 2,000 one-text embed tasks, measured with `gc.callbacks`). Frozen,
    they are skipped; a full pass walks only what came after. An unload unfreezes them first,
    so that the model's own cycles are collected with it."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


_FORMATS = {
    "llm": "GGUF file",
    "transcribe": "CTranslate2 whisper model directory",
    "embed": "sentence-transformers model directory",
}


def _missing(name: str, package: str, exc: ImportError) -> ModelError:
    return ModelError(f"model {name!r} needs {package}, which cannot be imported ({exc}); {INSTALL_HINT}")


def split_by_free(cards_free_mb: Sequence[int]) -> list[float]:
    """A model's share of each card, in proportion to the card's free memory (even where none
    is known free), rounded to 4 places (llama.cpp normalises them)."""
    free = [max(0, f) for f in cards_free_mb]
    total = sum(free)
    if total <= 0:
        return [round(1 / len(free), 4) for _ in free]
    return [round(f / total, 4) for f in free]


def llm_options(name: str, spec: ModelSpec, device: str, cards_free_mb: Sequence[int] = ()) -> dict[str, Any]:
    """The options llama.cpp loads the LLM with, besides its file. On a set of GPUs (more than
    one card's free memory) the model is split over them: by the spec's `tensor_split` if it
    has one (one share per card), else in proportion to each card's free memory; the first
    card (cuda:0) is the main GPU. Pure but for the CPU count: tested without llama.cpp."""
    cores = os.cpu_count() or 1
    options: dict[str, Any] = {
        "n_ctx": spec.n_ctx,
        "n_gpu_layers": spec.n_gpu_layers if device == "cuda" else 0,
        "n_threads": spec.threads or max(1, cores // 2),
        "n_threads_batch": spec.threads_batch or cores,
        "tensor_split": list(spec.tensor_split) or None,
        "seed": spec.seed,
        "verbose": False,
        "logits_all": False,
    }
    if spec.chat_format:  # how a chat task is rendered (mesh.host.chatrender reads it back)
        options["chat_format"] = spec.chat_format
    if len(cards_free_mb) > 1:
        if spec.tensor_split and len(spec.tensor_split) != len(cards_free_mb):
            raise ModelError(
                f"model {name!r}: tensor_split has {len(spec.tensor_split)} share(s) and this worker "
                f"owns {len(cards_free_mb)} GPUs; give one share per GPU, or leave tensor_split out "
                "to split by each GPU's free memory"
            )
        options["tensor_split"] = list(spec.tensor_split) or split_by_free(cards_free_mb)
        options["main_gpu"] = 0
    return options


def _load_llm(name: str, path: str, device: str, options: dict[str, Any]) -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise _missing(name, "llama-cpp-python", exc) from exc
    if device == "cuda" and options["n_gpu_layers"] != 0 and not llama_cpp.llama_supports_gpu_offload():
        raise ModelError(
            f"model {name!r}: this llama-cpp-python was built without GPU support, so it would run "
            "on the CPU; rebuild it with CMAKE_ARGS='-DGGML_CUDA=on' "
            f"(pip install --force-reinstall --no-cache-dir llama-cpp-python), "
            f"or set models.{name}.device = 'cpu'"
        )
    return llama_cpp.Llama(model_path=path, **options)


# compute types a CPU (or an older GPU) may lack, and what stands in for them
_COMPUTE_FALLBACK = {
    "float16": "float32",
    "bfloat16": "float32",
    "int8_float16": "int8",
    "int8_bfloat16": "int8",
    "int8_float32": "int8",
}


def whisper_compute_type(requested: str, device: str) -> str:
    """The CTranslate2 compute type to load with: the requested one if the device supports it,
    else its nearest supported stand-in (float16 on a CPU becomes float32, int8_float16 int8)."""
    import ctranslate2

    requested = requested or "default"
    if requested in ("default", "auto"):
        return requested
    supported = set(ctranslate2.get_supported_compute_types(device))
    choice = requested
    while choice not in supported and choice in _COMPUTE_FALLBACK:
        choice = _COMPUTE_FALLBACK[choice]
    return choice if choice in supported else "default"


def _load_whisper(name: str, spec: ModelSpec, path: str, device: str) -> Any:
    try:
        import faster_whisper
    except ImportError as exc:
        raise _missing(name, "faster-whisper", exc) from exc
    if device == "cuda":
        import ctranslate2

        if ctranslate2.get_cuda_device_count() < 1:
            raise ModelError(
                f"model {name!r}: CTranslate2 sees no CUDA device (check the driver and "
                f"CUDA_VISIBLE_DEVICES), or set models.{name}.device = 'cpu'"
            )
    return faster_whisper.WhisperModel(
        path,
        device=device,
        compute_type=whisper_compute_type(spec.compute_type, device),
        cpu_threads=spec.threads or os.cpu_count() or 0,
        local_files_only=True,
    )


def _load_embedder(name: str, spec: ModelSpec, path: str, device: str) -> Any:
    # never reach for a model hub: the registry names local directories only. The hub library
    # reads these when it is first imported, so they are set before that.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # and no progress bars in a worker's log
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import sentence_transformers
        import torch
    except ImportError as exc:
        raise _missing(name, "sentence-transformers (and torch)", exc) from exc
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"model {name!r}: torch sees no CUDA device (a CPU-only torch build, or a driver "
            f"problem; check CUDA_VISIBLE_DEVICES), or set models.{name}.device = 'cpu'"
        )
    return sentence_transformers.SentenceTransformer(path, device=device, local_files_only=True)
