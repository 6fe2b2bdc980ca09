"""A chat task's messages rendered with the model's own chat template, into prompt tokens.

The template is llama-cpp-python's chat handling: the registry's `chat_format` (a format
llama-cpp-python names, such as 'gemma' or 'chatml') when the model has one, else the GGUF's
`tokenizer.chat_template` (a Jinja template, rendered by llama-cpp-python's
`Jinja2ChatFormatter`). A model with neither cannot take a chat task: `ChatTemplateError` says
so and what to set, and the executor fails the task as a definition error.

The handler is run with a stand-in for the model that records the text it renders and the
stop strings it asks for, and generates nothing. Every message's content is rendered as a
placeholder, so that the tokens are then made piece by piece: the template's own text with its
control tokens (`<start_of_turn>`, `<|im_start|>` ...), each turn's text (the plan's words and
the inputs' data) with none. Text in a turn, an input above all, can never become a control
token, where tokenizing the whole rendered string would let it. (A tokenizer that puts a space
before each text it is given, as Llama 2's does, gets one at the start of each turn's text too.)

A template that drops the system turn (llama-cpp-python's 'gemma' format does) gets the system
text at the head of the first user turn instead, as Gemma's own template does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# a turn's text in the rendered template: private-use characters no template writes
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}([0-9]+){_CLOSE}")
CHAT_FORMAT_HINT = (
    "set models.{name}.chat_format to a llama-cpp-python chat format that fits the model "
    "(e.g. 'gemma', 'chatml', 'llama-3', 'mistral-instruct'), or use a '```prompt' body"
)


class ChatTemplateError(ValueError):
    """The model cannot render these turns: no template, an unknown format, a template that
    refuses them. No retry helps."""


@dataclass
class Rendered:
    prompt: str
    tokens: list[int]
    stop: list[str] = field(default_factory=list)


class _Captured(Exception):
    """Raised by the stand-in where generation would start: the render is complete."""


class _Recorder:
    """Stands in for a `llama_cpp.Llama` in a chat handler: keeps what the handler renders and
    asks for, and stops it before it generates."""

    verbose = False

    def __init__(self) -> None:
        self.text: str | None = None
        self.add_bos = True
        self.stop: list[str] = []

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        self.text, self.add_bos = text.decode("utf-8"), add_bos
        return []

    def create_completion(self, **kwargs: Any) -> Any:
        stop = kwargs.get("stop") or []
        self.stop = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]
        raise _Captured


def template_source(loaded: Any) -> str:
    """Where the model's chat template comes from ('chat_format NAME', 'the GGUF's template'),
    '' when it has none."""
    if loaded.spec.chat_format:
        return f"chat_format {loaded.spec.chat_format!r}"
    if (getattr(loaded.handle, "metadata", None) or {}).get("tokenizer.chat_template"):
        return "the GGUF's chat template"
    return ""


def _handler(loaded: Any) -> Any:
    from llama_cpp import llama_chat_format as formats

    llm, spec, name = loaded.handle, loaded.spec, loaded.name
    if spec.chat_format:
        try:
            return formats.get_chat_completion_handler(spec.chat_format)
        except formats.LlamaChatCompletionHandlerNotFoundException:
            known = ", ".join(sorted(formats.LlamaChatCompletionHandlerRegistry()._chat_handlers))
            raise ChatTemplateError(
                f"model {name!r} has chat_format {spec.chat_format!r}, which llama-cpp-python does "
                f"not know (it knows: {known})"
            ) from None
    template = (llm.metadata or {}).get("tokenizer.chat_template")
    if not template:
        raise ChatTemplateError(
            f"model {name!r} has no chat template: its GGUF carries none (no tokenizer.chat_template) "
            f"and the registry gives it no chat_format; " + CHAT_FORMAT_HINT.format(name=name)
        )
    eos, bos = llm.token_eos(), llm.token_bos()

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    return formats.Jinja2ChatFormatter(
        template=template, eos_token=text(eos), bos_token=text(bos), stop_token_ids=[eos]
    ).to_chat_handler()


def _render(loaded: Any, handler: Any, roles: Sequence[str]) -> _Recorder:
    recorder = _Recorder()
    placeholders = [{"role": role, "content": f"{_OPEN}{i}{_CLOSE}"} for i, role in enumerate(roles)]
    try:
        handler(llama=recorder, messages=placeholders, max_tokens=1)
    except _Captured:
        pass
    except Exception as exc:  # a Jinja template's raise_exception, a template error
        raise ChatTemplateError(
            f"the chat template of model {loaded.name!r} ({template_source(loaded)}) refused the "
            f"turns: {type(exc).__name__}: {exc}"
        ) from None
    if recorder.text is None:
        raise ChatTemplateError(
            f"model {loaded.name!r}: {template_source(loaded)} is a chat handler that renders no "
            "prompt mesh can read; " + CHAT_FORMAT_HINT.format(name=loaded.name)
        )
    return recorder


def render_chat(loaded: Any, messages: Sequence[Mapping[str, str]]) -> Rendered:
    """The prompt (as text) and its tokens for `messages`, and the template's stop strings.
    Raises ChatTemplateError when the model cannot render them."""
    handler = _handler(loaded)
    contents = [m["content"] for m in messages]
    roles = [m["role"] for m in messages]
    recorder = _render(loaded, handler, roles)
    seen = {int(n) for n in _PLACEHOLDER.findall(recorder.text or "")}
    if roles and roles[0] == "system" and 0 not in seen and len(roles) > 1:
        # the template has no place for a system turn: it opens the first user turn instead
        contents = [f"{contents[0]}\n\n{contents[1]}", *contents[2:]]
        roles = roles[1:]
        recorder = _render(loaded, handler, roles)
        seen = {int(n) for n in _PLACEHOLDER.findall(recorder.text or "")}
    for i, role in enumerate(roles):
        if i not in seen:
            raise ChatTemplateError(
                f"the chat template of model {loaded.name!r} ({template_source(loaded)}) leaves out "
                f"the {role} turn"
            )
    llm = loaded.handle
    tokens: list[int] = [llm.token_bos()] if recorder.add_bos else []
    prompt: list[str] = []
    for n, piece in enumerate(_PLACEHOLDER.split(recorder.text or "")):
        if n % 2:  # a turn's text: never a control token
            text = contents[int(piece)]
            special = False
        else:  # the template's own text
            text, special = piece, True
        if text:
            prompt.append(text)
            tokens += llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
    return Rendered(prompt="".join(prompt), tokens=tokens, stop=recorder.stop)
