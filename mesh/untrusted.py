"""Untrusted text inside a prompt: it goes in a `<data>` block it cannot open or close.

Used where a prompt is built from earlier outputs (the model executors, a review, an
escalation to Claude). Pure: a string in, a string out.
"""

from __future__ import annotations

import re

_DATA_TAG = re.compile(r"<(?=\s*/?\s*data)", re.IGNORECASE)


def neutralise_data(text: str) -> str:
    """Make untrusted text unable to open or close a <data> block: its '<' becomes '&lt;'."""
    return _DATA_TAG.sub("&lt;", text)
