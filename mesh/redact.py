"""Redaction: what must never leave the mesh (to Claude, or into exported training data).

One `Redactor` serves the gateway and `mesh export`, so both remove the same things:
API keys and tokens (by their providers' formats, and by the name they are given), AWS
secret access keys (beside their key id, or under a `secret` name), passwords (assigned, in
URLs, in `Authorization: Basic`, on `curl`/`mysql`/`sshpass` command lines, in `.netrc`),
private keys, e-mail addresses, IP addresses, and the patterns a user adds under `[redact]`
in the config. Each match becomes `[REDACTED:kind]` and is counted by kind, so an event or
a manifest can say what was taken out without saying what it was.

Patterns are applied in a fixed order, most specific first (a private key block before
the key-shaped strings inside it, a URL's password before the URL's host, an AWS secret
before its key id, which it is found by), and a marker is never matched again. A value
that is code or a placeholder (`settings.api_key`, `get_token()`, `password: str`,
`$DB_PASSWORD`, `{password}`, `...`, `<token>`) is not taken for a secret, nor are counts
named for tokens (`max_tokens=4096`), systemd units (`mesh-worker@0.service`), or the
loopback and unspecified addresses (`127.0.0.1`, `0.0.0.0`, `::1`).

`tests/data/secrets_corpus.toml` holds a sample of each format (all made up) and ordinary
text that must come through unchanged; `tests/test_redact.py` also runs the project's own
docs and source through and bounds what it takes out of them.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

MARK = "[REDACTED:{}]"
_NOT_MARK = r"(?!\[REDACTED)"

# Where a value stops: the characters of an assigned value, and a lookahead for its end.
_VALUE_CHAR = r"(?:[^\s\"'`,;\\]|\\(?![\\\"'`]))"
_END = r"(?![^\s\"'`,;@\\])"
# between a name and its value: `=` or `:` on the same line, quotes (escaped too, as in JSON
# inside a string) either side
_ASSIGN = r"\\?[\"'`]?[ \t]*[:=][ \t]*\\?[\"'`]?"
# A value that is code or a placeholder, not a secret: a call or subscript
# (`get_token()`, `os.environ["KEY"]`), a lower-case attribute path (`s.gateway_api_key`),
# a type (`password: str`), a reference (`$VAR`, `${VAR}`, `{name}`, `{{ name }}`), or a
# placeholder (`...`, `***`, `xxx`, `<password>`, `PASSWORD`). Put before a value's group.
_NOT_A_VALUE = (
    r"(?!(?-i:[A-Za-z_][\w.]*[(\[]"
    r"|[a-z_]+(?:\.[a-z_]+)+" + _END + r"|(?:str|bytes|None|SecretStr)" + _END + r"|Optional\["
    r"|\$\{?[A-Za-z_]\w*\}?" + _END + r"|\{\{|\{[^\s{}]*\}" + _END + r"|(?:\.\.\.|…|\*{3,}|[xX]{3,}"
    r"|<[^\s<>]*>|PASSWORD|PASSWD|SECRET|TOKEN|API_KEY)" + _END + r"))"
)

# A value that ends in the name it is assigned to: code passing an argument on
# (`api_key=api_key`, `password=self.password`). Needs the name in a group called `name`.
_NOT_THE_NAME = r"(?![\w.]{0,40}(?i:(?P=name))(?!\w))"

# An AWS secret access key: 40 characters of base64 with both cases in them (a git SHA or a
# hex digest has one case only), standing alone. Found beside its key id (the same line or
# up to three lines on, either side), or as the value of a name holding `secret`.
_AWS_ID = r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
_AWS_SECRET = (
    r"(?<![A-Za-z0-9/+_.\-])(?=[A-Za-z0-9/+=]{0,39}[a-z])(?=[A-Za-z0-9/+=]{0,39}[A-Z])"
    r"([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=_\-]|\.[A-Za-z0-9])"
)
_NEAR = r"(?:[^\n]{0,200}?|(?:[^\n]{0,200}\n){1,3}?[^\n]{0,200}?)"

# Keys and tokens known by their format: (pattern, literals in lower case of which every match
# holds one). Each is a rule, matched from a word boundary to the end of the key; every match
# is at least _RUN characters long.
_FORMATS: list[tuple[str, tuple[str, ...]]] = [
    (r"sk-ant-[A-Za-z0-9_\-]{16,}", ("sk-",)),  # Anthropic (api03, admin01)
    (r"sk-(?:proj-)?[A-Za-z0-9_\-]{20,}", ("sk-",)),  # OpenAI (also svcacct-, admin-)
    (r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}", ("akia", "asia", "abia", "acca")),  # AWS access key id
    (r"AIza[0-9A-Za-z_\-]{35}", ("aiza",)),  # Google API key
    (r"GOCSPX-[A-Za-z0-9_\-]{28}", ("gocspx-",)),  # Google OAuth client secret
    (r"ya29\.[A-Za-z0-9_\-]{30,}", ("ya29.",)),  # Google OAuth access token
    (r"gh[pousr]_[A-Za-z0-9]{30,}", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),  # GitHub
    (r"github_pat_[A-Za-z0-9_]{40,}", ("github_pat_",)),  # GitHub fine-grained
    (
        r"gl(?:pat|dt|rt|ptt|cbt|oas|soat|agent)-[A-Za-z0-9_\-]{20,}(?:\.[0-9a-z]{9})?",
        ("glpat-", "gldt-", "glrt-", "glptt-", "glcbt-", "gloas-", "glsoat-", "glagent-"),
    ),  # GitLab: personal, deploy, runner, trigger, job, OAuth app, SCIM, agent
    (r"GR1348941[A-Za-z0-9_\-]{20}", ("gr1348941",)),  # GitLab runner registration
    (r"(?:xoxe\.)?xox[abposre]-[A-Za-z0-9\-]{15,}", ("xox",)),  # Slack
    (r"xapp-\d-[A-Za-z0-9\-]{13,}", ("xapp-",)),  # Slack app-level
    (r"hf_[A-Za-z0-9]{30,}", ("hf_",)),  # Hugging Face
    (r"api_org_[A-Za-z0-9]{30,}", ("api_org_",)),  # Hugging Face organisation
    (r"npm_[A-Za-z0-9]{36}", ("npm_",)),
    (r"pypi-AgE[A-Za-z0-9_\-]{50,}", ("pypi-age",)),  # PyPI (and TestPyPI) upload token
    (r"[sr]k_(?:live|test|prod)_[A-Za-z0-9]{20,}", ("k_live_", "k_test_", "k_prod_")),  # Stripe
    (r"whsec_[A-Za-z0-9+/=]{32,}", ("whsec_",)),  # Stripe webhook signing secret
    (r"SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}", ("sg.",)),  # SendGrid
    (r"key-[0-9a-f]{32}", ("key-",)),  # Mailgun
    (r"shp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}", ("shp",)),  # Shopify
    (r"do[opr]_v1_[a-f0-9]{64}", ("_v1_",)),  # DigitalOcean
    (r"dapi[a-f0-9]{32}(?:-\d)?", ("dapi",)),  # Databricks
    (r"hv[sb]\.[A-Za-z0-9_\-]{90,}", ("hvs.", "hvb.")),  # HashiCorp Vault
    (r"[A-Za-z0-9]{14}\.atlasv1\.[A-Za-z0-9_\-=]{60,70}", ("atlasv1",)),  # Terraform Cloud
    (r"PMAK-[a-f0-9]{24}-[a-f0-9]{34}", ("pmak-",)),  # Postman
    (r"dckr_pat_[A-Za-z0-9_\-]{27,}", ("dckr_pat_",)),  # Docker Hub
    (r"glc_[A-Za-z0-9+/]{32,}={0,2}", ("glc_",)),  # Grafana Cloud
    (r"glsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}", ("glsa_",)),  # Grafana service account
    (r"sntry[su]_[A-Za-z0-9+/=_]{40,}", ("sntry",)),  # Sentry
    (r"ATATT3[A-Za-z0-9_\-=]{150,}", ("atatt3",)),  # Atlassian
    (r"HRKU-AA[A-Za-z0-9_\-]{58}", ("hrku-",)),  # Heroku
    (r"lin_api_[A-Za-z0-9]{40}", ("lin_api_",)),  # Linear
    (r"dp\.(?:pt|st|sa|ct)\.[A-Za-z0-9]{40,44}", ("dp.",)),  # Doppler
    (r"pul-[a-f0-9]{40}", ("pul-",)),  # Pulumi
    (r"NRAK-[A-Z0-9]{27}", ("nrak-",)),  # New Relic
    (r"sq0(?:atp|csp)-[A-Za-z0-9_\-]{22,60}", ("sq0",)),  # Square
    (r"EAAA[A-Za-z0-9_\-+/]{60,}", ("eaaa",)),  # Square access token
    (r"ntn_[0-9]{11}[A-Za-z0-9]{35}", ("ntn_",)),  # Notion
    (r"secret_[A-Za-z0-9]{43}", ("secret_",)),  # Notion (older)
    (r"ops_eyJ[A-Za-z0-9+/]{100,}={0,3}", ("ops_eyj",)),  # 1Password service account
    (r"gsk_[A-Za-z0-9]{48,}", ("gsk_",)),  # Groq
    (r"r8_[A-Za-z0-9]{37}", ("r8_",)),  # Replicate
    (r"pplx-[A-Za-z0-9]{48}", ("pplx-",)),  # Perplexity
    (r"xai-[A-Za-z0-9]{70,}", ("xai-",)),  # xAI
]

_AUTH_HEADER = r"[Aa](?<!\w[Aa])(?i:uthorization)" + _ASSIGN

# A match of some rules lies in one run of at least _RUN characters that are not white space,
# and so does the literal the rule looks for: those literals are looked for in the text's runs
# of that length only, a small part of most texts.
_RUN = 20

# (kind, pattern, the group that is secret: 0 for the whole match, literals in lower case of
# which every match holds at least one: a text with none of them cannot match, and the rule is
# not run on it; () to run it always, and whether every match lies in a run of _RUN). Most
# texts hold none of the literals, and looking for them costs far less than running the rules.
_BUILTIN: list[tuple[str, str, int, tuple[str, ...], bool]] = [
    (
        "private_key",
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----"
        r"(?:[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|[\s\S]*\Z)",
        0,
        ("private key",),
        False,
    ),
    # a PuTTY key file: the lines after `Private-Lines: N`
    (
        "private_key",
        r"Private-Lines:[ \t]*\d+[ \t]*\r?\n((?:[A-Za-z0-9+/=]+\r?\n)*[A-Za-z0-9+/=]+)",
        1,
        ("private-lines",),
        False,
    ),
    ("private_key", r"\bAGE-SECRET-KEY-1[0-9A-Z]{58}\b", 0, ("age-secret-key-1",), True),
    ("token", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}", 0, ("eyj",), True),
    ("api_key", _AWS_ID + _NEAR + _AWS_SECRET, 1, ("akia", "asia"), True),
    ("api_key", _AWS_SECRET + _NEAR + _AWS_ID, 1, ("akia", "asia"), True),
    (
        "api_key",
        r"[Ss\u017f](?i:ecret)[A-Za-z0-9_ .\-]{0,30}?[\s\"'`\\:=>]{1,6}" + _AWS_SECRET,
        1,
        ("secret",),
        False,
    ),
    *[("api_key", r"\b(?:" + p + r")(?![A-Za-z0-9])", 0, lits, True) for p, lits in _FORMATS],
    # credentials in a URL: scheme://user:PASSWORD@host (the user may be empty: redis://:PASSWORD@host)
    (
        "password",
        r"://[^\s:/@]*:" + _NOT_MARK + _NOT_A_VALUE + r"([^\s@/]+)@",
        1,
        ("://",),
        False,
    ),
    # a Twilio API key: its literal (`sk`) is in many words, so the pattern starts with `SK`, which
    # `re` looks for as fast as `in` does, and the word boundary comes after
    ("api_key", r"SK(?<=\bSK)[0-9a-fA-F]{32}(?![A-Za-z0-9])", 0, ("sk",), True),
    # Azure AD client secret
    (
        "api_key",
        r"(?<![A-Za-z0-9_~.\-])[A-Za-z0-9_~.]{3}\dQ~[A-Za-z0-9_~.\-]{31,34}(?![A-Za-z0-9_~.\-])",
        0,
        ("q~",),
        True,
    ),
    # Azure storage and Service Bus connection strings
    (
        "api_key",
        r"(?i)\b(?:AccountKey|SharedAccessKey)[ \t]*=[ \t]*" + _NOT_MARK + r"([A-Za-z0-9+/]{20,}={0,2})",
        1,
        ("accountkey", "sharedaccesskey"),
        False,
    ),
    # webhook URLs, whose last part is the credential
    (
        "token",
        r"\bhooks\.slack\.com/(?:services|workflows|triggers)/([A-Za-z0-9_/+\-]{20,})",
        1,
        ("hooks.slack.com",),
        True,
    ),
    (
        "token",
        r"\bdiscord(?:app)?\.com/api/(?:v\d+/)?webhooks/\d+/([A-Za-z0-9_\-]{20,})",
        1,
        ("discord",),
        True,
    ),
    # a Telegram bot token: the bot's id, a colon, and 35 characters starting with AA
    ("token", r"(?<![0-9])\d{8,10}:AA[A-Za-z0-9_\-]{33}(?![A-Za-z0-9_\-])", 0, (":aa",), True),
    # signed URLs: an Azure SAS, an S3 or GCS presigned signature
    ("token", r"[?&]sig=" + _NOT_MARK + r"([A-Za-z0-9%+/=]{16,})", 1, ("sig=",), True),
    ("token", r"(?i)[?&]X-(?:Amz|Goog)-Signature=([0-9a-f]{32,})", 1, ("-signature=",), True),
    (
        "password",
        _AUTH_HEADER + r"(?i:basic)[ \t]+" + _NOT_MARK + r"([A-Za-z0-9+/]{4,}={0,2})",
        1,
        ("authorization",),
        False,
    ),
    (
        "token",
        _AUTH_HEADER
        + r"(?i:token|bot|apikey|api-key|sso-key)[ \t]+"
        + _NOT_MARK
        + r"([A-Za-z0-9._~+/:\-]{8,}=*)",
        1,
        ("authorization",),
        False,
    ),
    (
        "token",
        r"[Bb](?<!\w[Bb])(?i:earer)\s+" + _NOT_MARK + r"([A-Za-z0-9._~+/\-]{8,}=*)",
        1,
        ("bearer",),
        False,
    ),
    # passwords on command lines and in .netrc
    (
        "password",
        r"curl(?<!\wcurl)\b[^\n]{0,500}?\s(?:-u|--user)(?:[ \t]+|=)\\?[\"']?[^\s:\"'\\]*:"
        + _NOT_MARK
        + _NOT_A_VALUE
        + r"([^\s\"'`\\]+)",
        1,
        ("curl",),
        False,
    ),
    (
        "password",
        r"mysql(?<!\wmysql)(?:dump|admin|sh)?\b[^\n]{0,500}?\s-p"
        + _NOT_MARK
        + _NOT_A_VALUE
        + r"([^\s\"'`\\]+)",
        1,
        ("mysql",),
        False,
    ),
    (
        "password",
        r"sshpass(?<!\wsshpass)[ \t]+-p[ \t]*\\?[\"']?" + _NOT_MARK + _NOT_A_VALUE + r"([^\s\"'`\\]+)",
        1,
        ("sshpass",),
        False,
    ),
    (
        "password",
        r"[MmDd](?<!\w[MmDd])(?:(?<=[Mm])(?i:achine)\s+\S+|(?<=[Dd])(?i:efault))"
        r"\s+(?i:login)\s+\S+(?:\s+(?i:account)\s+\S+)?\s+(?i:password)\s+" + _NOT_MARK + r"(\S+)",
        1,
        ("password",),
        False,
    ),
    # a value assigned to a name that ends in password (or `_pass`); not the name itself, as in
    # `password=password` (code passing an argument on)
    (
        "password",
        r"(?P<name>[Pp](?i:assword|asswd|assphrase|wd|(?<=[_\-][Pp])ass))"
        + _ASSIGN
        + _NOT_MARK
        + _NOT_A_VALUE
        + _NOT_THE_NAME
        + "("
        + _VALUE_CHAR
        + "+)",
        2,
        ("passw", "passphrase", "pwd", "_pass", "-pass"),
        False,
    ),
    # a value named for a key, secret, token or credential; not `max_tokens`, `tokenizer`,
    # `author`, nor a name for one (`secret_name`, `token_file`, `auth_type`, `token_ttl`)
    (
        "token",
        r"(?P<name>[AaSsTt\u017f](?i:(?<=[Aa])(?:pi[_\-]?key|ccess[_\-]?key|uth(?!or(?!i[sz])))"
        r"|(?<=[Ss\u017f])ecret|(?<=[Tt])oken(?!s|i[sz]))(?i:[a-z0-9_\-]{0,40}))"
        r"(?i:(?<!name)(?<!file)(?<!path)(?<!size)(?<!length)(?<!ttl)(?<!type)(?<!url)(?<!uri)(?<!dir))"
        + _ASSIGN
        + _NOT_MARK
        + _NOT_A_VALUE
        + _NOT_THE_NAME
        + "("
        + _VALUE_CHAR
        + "{8,})",
        2,
        ("api_key", "api-key", "apikey", "secret", "token", "access_key", "access-key", "accesskey", "auth"),
        False,
    ),
    # an address, but not git's (`git@github.com:org/repo`), a placeholder's in a URL
    # (`nats://user:PASSWORD@host`), or a systemd unit's instance (`mesh-worker@0.service`)
    (
        "email",
        r"\b(?!git@|PASSWORD@|SECRET@|TOKEN@)[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9.\-]{1,253}\.[A-Za-z]{2,63}\b"
        + "".join(
            f"(?<!\\.{u})" for u in ("service", "socket", "target", "timer", "mount", "slice", "scope")
        ),
        0,
        ("@",),
        False,
    ),
]


def _fold(text: str) -> str:
    """Lower case as case-insensitive matching sees it: besides what lower() maps, `re` takes
    the dotless i and the dotted capital I (whose lower() is two characters) for an i, and the
    long s for an s. (isascii() is a flag read; replace() is much faster than translate().)"""
    if text.isascii():
        return text.lower()
    return text.replace("\u0130", "i").replace("\u0131", "i").replace("\u017f", "s").lower()


# an IPv4 address holds a digit, a dot and a digit; an IPv6 one at least two colons
_IPV4_HINT = re.compile(r"\d\.\d")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]*\d)")
_IPV6 = re.compile(r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])")


class PatternError(ValueError):
    """A configured redaction pattern that does not compile."""


def _is_host_ip(text: str) -> bool:
    """An IP address that names a host: not the loopback or the unspecified address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_unspecified)


class Redactor:
    """Replaces secrets and personal data with `[REDACTED:kind]`, counting each kind."""

    def __init__(self, extra: Mapping[str, str] | None = None) -> None:
        self._rules: list[tuple[str, re.Pattern[str], int, tuple[str, ...], bool]] = []
        for kind, pattern, group, needs, in_run in _BUILTIN:
            self._rules.append((kind, re.compile(pattern), group, needs, in_run))
        for name, pattern in (extra or {}).items():
            try:
                self._rules.append((name, re.compile(pattern), 0, (), False))
            except re.error as exc:
                raise PatternError(f"redaction pattern {name!r} ({pattern!r}): {exc}") from exc

    def text(self, value: str, counts: Counter[str] | None = None) -> tuple[str, Counter[str]]:
        """The text with every match replaced, and the number replaced per kind."""
        counts = Counter() if counts is None else counts
        lowered = _fold(value)
        runs: str | None = None  # the runs of _RUN characters of `lowered`, when first needed
        for kind, pattern, group, needs, in_run in self._rules:
            if needs:
                if in_run and runs is None:
                    runs = " ".join(w for w in lowered.split() if len(w) >= _RUN)
                where = runs if in_run and runs is not None else lowered
                if not any(n in where for n in needs):
                    continue
            replaced = pattern.sub(_replacer(kind, group, counts), value)
            if replaced != value:
                value, lowered, runs = replaced, _fold(replaced), None
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
        if not _is_host_ip(match.group(0)):
            return match.group(0)
        counts["ip"] += 1
        return MARK.format("ip")

    return replace
