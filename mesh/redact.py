"""Redaction: what must never leave the mesh (to Claude, or into exported training data).

One `Redactor` serves the gateway and `mesh export`, so both remove the same things:
API keys and tokens, passwords, private keys, e-mail addresses, IP addresses, and the
patterns a user adds under `[redact]` in the config. Each match becomes `[REDACTED:kind]`
and is counted by kind, so an event or a manifest can say what was taken out without
saying what it was.

Patterns are applied in a fixed order, most specific first (a private key block before
the key-shaped strings inside it, a URL's password before the URL's host), and a marker
is never matched again.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

MARK = "[REDACTED:{}]"
_NOT_MARK = r"(?!\[REDACTED)"

# (kind, pattern, the group that is secret: 0 for the whole match, and literals in lower case of
# which every match holds at least one: a text with none of them cannot match, and the rule is
# not run on it; () to run it always). Run through every rule, a 4 KiB log tail costs about
# 1.5 ms; most texts hold none of the literals, and looking for them costs microseconds.
_BUILTIN: list[tuple[str, str, int, tuple[str, ...]]] = [
    (
        "private_key",
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----"
        r"(?:[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|[\s\S]*\Z)",
        0,
        ("private key",),
    ),
    # credentials in a URL: scheme://user:PASSWORD@host
    ("password", r"(?i)\b[a-z][a-z0-9+.\-]*://[^\s:/@]+:" + _NOT_MARK + r"([^\s@/]+)@", 1, ("://",)),
    # well-known key formats
    (
        "api_key",
        r"\b(?:sk-ant-[A-Za-z0-9_\-]{16,}|sk-(?:proj-)?[A-Za-z0-9_\-]{20,}"
        r"|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|AIza[0-9A-Za-z_\-]{35}"
        r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,}|glpat-[A-Za-z0-9_\-]{20,}"
        r"|xox[abposr]-[A-Za-z0-9\-]{10,}|hf_[A-Za-z0-9]{30,}|npm_[A-Za-z0-9]{36}"
        r"|sk_live_[A-Za-z0-9]{20,}|rk_live_[A-Za-z0-9]{20,})",
        0,
        (
            "sk-",
            "akia",
            "asia",
            "aiza",
            "ghp_",
            "gho_",
            "ghu_",
            "ghs_",
            "ghr_",
            "github_pat_",
            "glpat-",
            "xox",
            "hf_",
            "npm_",
            "sk_live_",
            "rk_live_",
        ),
    ),
    ("token", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}", 0, ("eyj",)),
    ("token", r"(?i)\bBearer\s+" + _NOT_MARK + r"([A-Za-z0-9._~+/\-]{8,}=*)", 1, ("bearer",)),
    (
        "password",
        r"(?i)\b[a-z0-9_\-]*(?:password|passwd|passphrase|pwd)[\"']?\s*[:=]\s*[\"']?"
        + _NOT_MARK
        + r"([^\s\"',;]{1,})",
        1,
        ("passw", "passphrase", "pwd"),
    ),
    (
        "token",
        r"(?i)\b[a-z0-9_\-]*(?:api[_\-]?key|secret|token|access[_\-]?key|auth)[a-z0-9_\-]*"
        r"[\"']?\s*[:=]\s*[\"']?" + _NOT_MARK + r"([^\s\"',;]{8,})",
        1,
        ("api_key", "api-key", "apikey", "secret", "token", "access_key", "access-key", "accesskey", "auth"),
    ),
    ("email", r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b", 0, ("@",)),
]

# Lower case as case-insensitive matching sees it: besides what lower() maps, `re` takes the
# dotless i for an i and the long s for an s.
_FOLD = str.maketrans({"\u0131": "i", "\u017f": "s"})
# an IPv4 address holds a digit, a dot and a digit; an IPv6 one at least two colons
_IPV4_HINT = re.compile(r"\d\.\d")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]*\d)")
_IPV6 = re.compile(r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])")


class PatternError(ValueError):
    """A configured redaction pattern that does not compile."""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Redactor:
    """Replaces secrets and personal data with `[REDACTED:kind]`, counting each kind."""

    def __init__(self, extra: Mapping[str, str] | None = None) -> None:
        self._rules: list[tuple[str, re.Pattern[str], int, tuple[str, ...]]] = []
        for kind, pattern, group, needs in _BUILTIN:
            self._rules.append((kind, re.compile(pattern), group, needs))
        for name, pattern in (extra or {}).items():
            try:
                self._rules.append((name, re.compile(pattern), 0, ()))
            except re.error as exc:
                raise PatternError(f"redaction pattern {name!r} ({pattern!r}): {exc}") from exc

    def text(self, value: str, counts: Counter[str] | None = None) -> tuple[str, Counter[str]]:
        """The text with every match replaced, and the number replaced per kind."""
        counts = Counter() if counts is None else counts
        lowered = value.lower().translate(_FOLD)
        for kind, pattern, group, needs in self._rules:
            if needs and not any(n in lowered for n in needs):
                continue
            replaced = pattern.sub(_replacer(kind, group, counts), value)
            if replaced != value:
                value, lowered = replaced, replaced.lower().translate(_FOLD)
        if _IPV4_HINT.search(value):
            value = _IPV4.sub(_ip_replacer(counts), value)
        if value.count(":") >= 2:
            value = _IPV6.sub(_ip_replacer(counts), value)
        return value, counts

    def value(self, obj: Any, counts: Counter[str] | None = None) -> tuple[Any, Counter[str]]:
        """Like `text`, through the strings of a JSON-shaped value (keys included)."""
        counts = Counter() if counts is None else counts
        return self._walk(obj, counts), counts

    def _walk(self, obj: Any, counts: Counter[str]) -> Any:
        if isinstance(obj, str):
            return self.text(obj, counts)[0]
        if isinstance(obj, dict):
            return {self._walk(k, counts): self._walk(v, counts) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self._walk(v, counts) for v in obj]
        return obj


def _replacer(kind: str, group: int, counts: Counter[str]) -> Callable[[re.Match[str]], str]:
    mark = MARK.format(kind)

    def replace(match: re.Match[str]) -> str:
        counts[kind] += 1
        if group == 0:
            return mark
        whole, start, end = match.group(0), match.start(group), match.end(group)
        offset = match.start(0)
        return whole[: start - offset] + mark + whole[end - offset :]

    return replace


def _ip_replacer(counts: Counter[str]) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "::" or not _is_ip(match.group(0)):
            return match.group(0)
        counts["ip"] += 1
        return MARK.format("ip")

    return replace
