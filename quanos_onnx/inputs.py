"""Reading the user's input files safely: regular files only, bounded size and nesting.

A named pipe given as --data or --plan would block open() forever and /dev/zero would read
until memory runs out, so every input is checked with os.stat (which never blocks) before
it is opened, and small documents (plans, hardware profiles) are read up to a size limit.
JSON documents are refused past a nesting depth, so a 200,000-deep plan is a one-line
error instead of a RecursionError somewhere downstream.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import QuanosError

MAX_DOCUMENT_BYTES = 8 << 20
"""Largest plan or hardware-profile file read (8 MiB; a compiled ResNet-50's plan with its
ANS and energy details is under 200 kB)."""

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in a JSON document."""


def check_regular_file(path: str | os.PathLike[str], error: type[QuanosError], what: str = "file") -> int:
    """Refuse at once what is missing, a directory or not a regular file; return its size."""
    source = Path(path)
    try:
        mode = os.stat(source)
    except FileNotFoundError:
        raise error(f"{source}: {what} not found") from None
    except OSError as exc:
        raise error(f"{source}: cannot read {what}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode.st_mode):
        raise error(f"{source}: is a directory, not a {what}")
    if not stat.S_ISREG(mode.st_mode):
        raise error(f"{source}: not a regular file ({special_kind(mode.st_mode)})")
    return mode.st_size


def special_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def read_document(path: str | os.PathLike[str], error: type[QuanosError], what: str) -> Any:
    """A JSON document from a regular file of at most MAX_DOCUMENT_BYTES, nested at most
    MAX_JSON_DEPTH deep; every failure is `error` naming the file."""
    source = Path(path)
    size = check_regular_file(source, error, what)
    if size > MAX_DOCUMENT_BYTES:
        raise error(f"{source}: {size} bytes, larger than the {MAX_DOCUMENT_BYTES >> 20} MiB a {what} may have")
    try:
        with open(source, "rb") as stream:
            raw = stream.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise error(f"{source}: cannot read {what}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise error(f"{source}: larger than the {MAX_DOCUMENT_BYTES >> 20} MiB a {what} may have")
    return parse_json(raw, str(source), error)


def parse_json(raw: bytes | str, source: str, error: type[QuanosError]) -> Any:
    """json.loads with the failures of malformed, non-UTF-8 or too deeply nested text as `error`."""
    try:
        text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise error(f"{source}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{source}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc
    except RecursionError:
        raise error(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise error(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def json_depth(data: Any) -> int:
    """Nesting depth of arrays and objects (a scalar is 0), without recursion."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(data, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        if depth + 1 <= MAX_JSON_DEPTH:
            pending.extend((child, depth + 1) for child in children)
    return deepest
