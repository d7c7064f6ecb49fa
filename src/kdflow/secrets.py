"""Keeping credentials out of what a run prints, logs and passes on: URIs' user-info and secret-looking values."""

from __future__ import annotations

import re

MASK = "***"
_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")
# keys whose values are credentials whatever they hold (arch_kwargs and other free-form mappings may carry them)
SECRET_KEY = re.compile(r"(pass(word|wd)?|secret|token|api[_-]?key|credential|private[_-]?key)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the user-info of every URI in it replaced by `***` (`http://***@host`)."""
    return _USERINFO.sub(MASK + "@", text)


def redact_value(key: str, value: str) -> str:
    """A config value as it may be logged: masked whole under a secret-looking key, else its URIs redacted."""
    return MASK if SECRET_KEY.search(key.rsplit(".", 1)[-1]) else redact(value)


def scrub(value, key: str = ""):
    """`value` (mappings and lists walked) with values under secret-looking keys masked and URIs redacted."""
    if key and SECRET_KEY.search(str(key).rsplit(".", 1)[-1]):
        return MASK
    if isinstance(value, dict):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return redact(value) if isinstance(value, str) else value
