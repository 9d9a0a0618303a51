"""MQTT topic names: what the config may put into a topic (one level, a prefix of levels).

MQTT 5 (4.7): topic names are UTF-8 of at most 65,535 bytes without U+0000;
``+`` and ``#`` are wildcards and may not appear in a name we publish to; a
name starting with ``$`` is the broker's (``$SYS``, ``$share``) and matched
by no ``#`` subscription. edged builds ``P/in/+``, ``P/out/<stream>``,
``P/status`` ... from the prefix, so a prefix must be a valid topic name
itself: with a ``+`` in it the broker refuses our subscription and the
daemon never serves. Empty levels (``a//b``, a leading ``/``) are valid
MQTT but almost always a typo, and refused here. Control characters are
refused too (the spec says they SHOULD NOT appear; they break logs).
"""
from __future__ import annotations

MAX_PREFIX_BYTES = 512  # room for P/out/<stream of 128 bytes>/... well inside the MQTT limit
MAX_LEVEL_BYTES = 128   # as a stream name (INTERFACE.md)


def _bad_char(text: str) -> str | None:
    for ch in text:
        if ch in "+#":
            return f"must not contain the MQTT wildcard {ch!r}"
        if ch == "\0":
            return "must not contain a NUL character"
        if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            return f"must not contain the control character {ch!r}"
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return "must be valid UTF-8 (holds a lone surrogate)"
    return None


def text_problem(text: str) -> str | None:
    """Why `text` cannot be an MQTT string we send (a client id): NUL, control characters, not UTF-8."""
    for ch in text:
        if ch in "+#":
            continue
        bad = _bad_char(ch)
        if bad:
            return f"{bad} (got {text!r})"
    return None


def level_problem(text: str) -> str | None:
    """Why `text` cannot be one topic level (device_id, a share group), or None when it can."""
    if not text:
        return "must not be empty"
    if "/" in text:
        return f"must be one topic level, without '/' (got {text!r})"
    bad = _bad_char(text)
    if bad:
        return f"{bad} (got {text!r})"
    if len(text.encode("utf-8")) > MAX_LEVEL_BYTES:
        return f"must be at most {MAX_LEVEL_BYTES} bytes in UTF-8"
    return None


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` (a topic name edged appends levels to) is not usable, or None.

    A trailing '/' is allowed (it is dropped), everything else must be
    non-empty levels of plain characters, not starting with '$'.
    """
    body = prefix.rstrip("/")
    if not body:
        return "must not be empty"
    bad = _bad_char(body)
    if bad:
        return f"{bad} (got {prefix!r})"
    if body.startswith("$"):
        return f"must not start with '$': such topics are the broker's (got {prefix!r})"
    if body.startswith("/"):
        return f"must not start with '/' (an empty first topic level; got {prefix!r})"
    if "//" in body:
        return f"must not hold an empty topic level ('//'; got {prefix!r})"
    if len(body.encode("utf-8")) > MAX_PREFIX_BYTES:
        return f"must be at most {MAX_PREFIX_BYTES} bytes in UTF-8"
    return None


def name_problem(name: str) -> str | None:
    """Why `name` is not a topic a client may publish to (a Response Topic), or None.

    MQTT 5 4.7: not empty, no wildcard, no NUL, at most 65,535 bytes of UTF-8.
    Empty levels and a leading '$' are valid here: the peer chose them.
    """
    if not name:
        return "must not be empty"
    for ch in name:
        if ch in "+#":
            return f"must not contain the MQTT wildcard {ch!r}"
        if ch == "\0":
            return "must not contain a NUL character"
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return "must be valid UTF-8 (holds a lone surrogate)"
    if len(name.encode("utf-8")) > 65535:
        return "must be at most 65535 bytes in UTF-8"
    return None


def filter_problem(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a valid subscription filter (MQTT 5 4.7.1), or None.

    '+' must fill a whole level; '#' must fill the last level.
    """
    if not topic_filter:
        return "must not be empty"
    if "\0" in topic_filter:
        return "must not contain a NUL character"
    if len(topic_filter.encode("utf-8", "surrogatepass")) > 65535:
        return "must be at most 65535 bytes in UTF-8"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return f"'+' must fill a whole topic level (got {level!r})"
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"'#' must fill the last topic level (got {topic_filter!r})"
    return None
