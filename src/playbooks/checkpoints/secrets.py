"""Secrets that must never be stored: the values of named environment variables (the model's API key,
the checkpoint key, any listed in ``durability.secret_env``).

A record, a cassette interaction or a value sent to an isolated worker that holds one of them is
refused with :class:`~playbooks.errors.SecretStoredError`, naming the variable: a key that a tool
returned, or that code put in a variable, never reaches the disk. The check looks for the value's
UTF-8 bytes (a pickled ``str`` holds them as they are), before compression; values shorter than
``MIN_LENGTH`` are not checked (too likely to occur by chance).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from playbooks.errors import SecretStoredError

__all__ = ("MIN_LENGTH", "Secret", "check_secrets", "secrets_from_env")

MIN_LENGTH = 8


@dataclass(frozen=True, slots=True)
class Secret:
    """The value of the environment variable ``name``, as bytes to look for."""

    name: str
    value: bytes

    def __repr__(self) -> str:  # never print the value
        return f"Secret({self.name!r})"


def secrets_from_env(names: Iterable[str], environ: Mapping[str, str] | None = None) -> tuple[Secret, ...]:
    """The secrets of the variables ``names`` that are set (with ``MIN_LENGTH`` characters or more)."""
    environ = os.environ if environ is None else environ
    found: dict[str, Secret] = {}
    for name in names:
        value = environ.get(name, "")
        if name and len(value) >= MIN_LENGTH:
            found[name] = Secret(name, value.encode("utf-8"))
    return tuple(found.values())


def check_secrets(data: bytes, secrets: Iterable[Secret], what: str) -> None:
    """Raise :class:`SecretStoredError` if ``data`` holds a secret's value; ``what`` says what
    ``data`` is ("a checkpoint record of frame 'Main'")."""
    for secret in secrets:
        if secret.value in data:
            raise SecretStoredError(
                f"{what} would hold the value of ${secret.name}, a secret (durability.secret_env; the "
                "model's API key and the checkpoint key always are); it was not stored. A tool returned it "
                "or the code put it in a variable: keep keys in the host, out of results and variables",
                name=secret.name,
            )
