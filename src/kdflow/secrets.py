"""Keeping credentials out of what a run prints, logs and passes on: URIs' user-info and secret-looking values."""

from __future__ import annotations

import re

MASK = "***"
_USERINFO = re.compile(r"(?<=://)([^/\s@]+)@")  # a URI's user-info (group 1)
# keys whose values are credentials whatever they hold (arch_kwargs and other free-form mappings may carry them)
SECRET_KEY = re.compile(r"(pass(word|wd)?|secret|token|api[_-]?key|credential|private[_-]?key)", re.IGNORECASE)
SECRET_NAMES = {"s3_secret", "secret_keys"}  # `cluster` keys that name a Kubernetes Secret and its keys: no credentials
ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")  # a config value's reference to an environment variable


def secret_key(key: str) -> bool:
    """Whether values under `key` (a dotted path: its last part decides) are credentials: a secret-looking name
    that does not merely name a Kubernetes Secret (`SECRET_NAMES`)."""
    name = key.rsplit(".", 1)[-1]
    return bool(SECRET_KEY.search(name)) and name not in SECRET_NAMES


def redact(text: str) -> str:
    """`text` with the user-info of every URI in it replaced by `***` (`http://***@host`)."""
    return _USERINFO.sub(MASK + "@", text)


def redact_value(key: str, value: str) -> str:
    """A config value as it may be logged: masked whole under a secret-looking key, else its URIs redacted."""
    return MASK if secret_key(key) else redact(value)


def scrub(value, key: str = ""):
    """`value` (mappings and lists walked) with values under secret-looking keys masked and URIs redacted; the
    same values `to_env` takes for credentials, so a config without any comes back equal."""
    if isinstance(value, str) and ENV_REF.fullmatch(value):
        return value  # a reference to a variable, not a credential
    if key and secret_key(str(key)):
        return MASK
    if isinstance(value, dict):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return redact(value) if isinstance(value, str) else value


SECRET_ENV = "KDFLOW_SECRET_"  # the variables a local run moves a config's credentials into


def to_env(value, key: str = "") -> tuple[object, dict[str, str]]:
    """`value` (a config as JSON data) with every credential in it replaced by a reference `${env:NAME}` to an
    environment variable, and those variables' values: what a local run passes its steps instead, so their command
    lines (visible in `ps`) never hold a credential. Credentials: values under secret-looking keys, URIs'
    user-info. References already there stay."""
    env: dict[str, str] = {}

    def ref(secret: str) -> str:
        import hashlib

        name = SECRET_ENV + hashlib.sha1(secret.encode()).hexdigest()[:12].upper()
        env[name] = secret
        return "${env:" + name + "}"

    def walk(v, k: str):
        if isinstance(v, dict):
            return {kk: walk(vv, str(kk)) for kk, vv in v.items()}
        if isinstance(v, list):
            return [walk(vv, k) for vv in v]
        if not isinstance(v, str) or ENV_REF.fullmatch(v):
            return v
        if k and secret_key(k):
            return ref(v)
        return _USERINFO.sub(lambda m: m.group(0) if ENV_REF.fullmatch(m.group(1)) else ref(m.group(1)) + "@", v)

    return walk(value, key), env


def from_env(value, environ=None):
    """`value` with every `${env:NAME}` reference replaced by that environment variable's value (`to_env`'s
    inverse, and how a config on a cluster names a credential its pods get from a Kubernetes Secret). A missing
    variable is a `KeyError` naming it."""
    import os

    environ = os.environ if environ is None else environ

    def sub(m: re.Match) -> str:
        if m.group(1) not in environ:
            raise KeyError(f"the config refers to the environment variable {m.group(1)}, which is not set")
        return environ[m.group(1)]

    if isinstance(value, dict):
        return {k: from_env(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [from_env(v, environ) for v in value]
    return ENV_REF.sub(sub, value) if isinstance(value, str) else value
