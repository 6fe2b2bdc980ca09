"""Redaction: each kind of secret is removed and counted, ordinary text is left alone."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import redact
from mesh.redact import PatternError, Redactor

KEY_BLOCK = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
    "-----END OPENSSH PRIVATE KEY-----"
)

CASES = [
    ("key sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv_wx here", "sk-ant-api03", "api_key"),
    ("aws AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE", "api_key"),
    ("gh ghp_0123456789abcdefghijABCDEFGHIJ012345", "ghp_0123", "api_key"),
    ("hf hf_abcdefghijklmnopqrstuvwxyzABCDEF", "hf_abcdef", "api_key"),
    ("Authorization: Bearer abc.def-ghi_jkl012", "abc.def-ghi_jkl012", "token"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "eyJ", "token"),
    ("export GITHUB_TOKEN=abcd1234efgh5678", "abcd1234efgh5678", "token"),
    ('{"api_key": "zzzzzzzzzzzz9"}', "zzzzzzzzzzzz9", "token"),
    ("password: hunter2", "hunter2", "password"),
    ("DB_PASSWORD='s3cr3t!'", "s3cr3t!", "password"),
    ("postgres://app:pa55word@db.internal:5432/x", "pa55word", "password"),
    (f"here\n{KEY_BLOCK}\nthere", "b3BlbnNzaC1r", "private_key"),
    ("mail ada@example.org now", "ada@example.org", "email"),
    ("host 192.168.1.20 up", "192.168.1.20", "ip"),
    ("v6 2001:db8::8a2e:370:7334 and ::1", "2001:db8", "ip"),
]


@pytest.mark.parametrize(("text", "secret", "kind"), CASES)
def test_each_kind_is_removed_and_counted(text: str, secret: str, kind: str) -> None:
    out, counts = Redactor().text(text)
    assert secret not in out
    assert f"[REDACTED:{kind}]" in out
    assert counts[kind] >= 1


@pytest.mark.parametrize(
    "text",
    [
        "Summarise the meeting at 12:30:45 in 3 bullet points.",
        "version 1.2.3 of std::vector, the token count was 512",
        "password policy: see the wiki",  # a word after "password" with no value marker
        "an unterminated ratio 3.14 and 10.0.0",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    out, counts = Redactor().text(text)
    assert out == text, counts
    assert not counts


def test_unterminated_private_key_is_removed_to_the_end() -> None:
    out, counts = Redactor().text("begin -----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAKCAQEA")
    assert "MIIEow" not in out and counts["private_key"] == 1


def test_configured_patterns_and_nested_values() -> None:
    redactor = Redactor({"employee_id": r"\bEMP-\d{6}\b"})
    value, counts = redactor.value(
        {"prompt": "EMP-123456 asked", "nested": ["mail bob@example.com", 3, None]}
    )
    assert value == {
        "prompt": "[REDACTED:employee_id] asked",
        "nested": ["mail [REDACTED:email]", 3, None],
    }
    assert counts == {"employee_id": 1, "email": 1}


def test_redacting_twice_changes_nothing() -> None:
    once, _ = Redactor().text("token=abcdefgh12345 password=x ada@example.org 10.0.0.1")
    twice, counts = Redactor().text(once)
    assert twice == once
    assert not counts


def test_a_bad_pattern_names_itself() -> None:
    with pytest.raises(PatternError, match="broken"):
        Redactor({"broken": "(unclosed"})


# ------------------------------------------------------------------ the literal pre-check


def every_rule(redactor: Redactor, text: str) -> tuple[str, Counter[str]]:
    """The redaction with every rule run on every text (no literal pre-check)."""
    counts: Counter[str] = Counter()
    for kind, pattern, group, _needs in redactor._rules:
        text = pattern.sub(redact._replacer(kind, group, counts), text)
    text = redact._IPV4.sub(redact._ip_replacer(counts), text)
    text = redact._IPV6.sub(redact._ip_replacer(counts), text)
    return text, counts


FRAGMENTS = [text for text, _, _ in CASES] + [
    "paſsword=hunter2",  # the long s: `re` matches it as an s without (?i) knowing a case
    "apı_key: abcdefgh12345",  # the dotless i
    "ToKEN=zzzzzzzz99",  # the Kelvin sign
    "AUTHORIZATION: BEARER abcdefgh1234",
    "ftp://u:pw@host",
    "12:30:45",
    "fe80::1",
    "1.2.3.4",
    "v1.2.3",
    "std::vector",
    "an ordinary line of a build log",
    "ŞİŞLİ",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)), min_size=1, max_size=8),
    st.sampled_from([" ", "\n", "", "=", ":"]),
)
def test_the_literal_pre_check_changes_no_result(parts: list[str], sep: str) -> None:
    redactor = Redactor({"employee_id": r"\bEMP-\d{6}\b"})
    text = sep.join(parts)
    assert redactor.text(text) == every_rule(redactor, text)


def test_the_literal_pre_check_catches_case_folded_secrets() -> None:
    for text in ("paſsword=hunter2", "apı_key: abcdefgh12345", "ToKEN=zzzzzzzz99"):
        out, counts = Redactor().text(text)
        assert out != text and sum(counts.values()) == 1, (text, out)
