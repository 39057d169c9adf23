"""Request validation for the API: every error names the offending field."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from flask import request

# Names of VMs, points, repositories, sessions, jobs, tokens. Use .fullmatch: .match lets "name\n" through '$'.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,199}$")
MAX_STRING = 4096  # no string field is longer (paths are the longest: PATH_MAX)
MAX_ITEMS = 256  # no list field has more items


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Field:
    name: str
    kind: type | tuple[type, ...]
    required: bool = False
    choices: tuple[Any, ...] = ()
    default: Any = None
    pattern: re.Pattern | None = None
    absolute_path: bool = False
    max_length: int | None = None  # characters of a string, items of a list (default MAX_STRING / MAX_ITEMS)
    items: Field | None = None  # how each item of a list is checked (its name gets the index)

    def check(self, value: Any) -> Any:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        # bool is an int in Python; JSON true must not pass for a number or vice versa.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ApiError(400, f"{self.name}: expected {_kind_name(kinds)}, got {_json_type(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ApiError(400, f"{self.name}: expected a finite number, got {value}")
        if isinstance(value, str | list):
            limit = self.max_length or (MAX_ITEMS if isinstance(value, list) else MAX_STRING)
            if len(value) > limit:
                unit = "items" if isinstance(value, list) else "characters"
                raise ApiError(400, f"{self.name}: at most {limit} {unit}, got {len(value)}")
        if isinstance(value, str) and "\x00" in value:
            raise ApiError(400, f"{self.name}: must not contain NUL characters")
        if self.choices and value not in self.choices:
            raise ApiError(400, f"{self.name}: must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise ApiError(400, f"{self.name}: {value[:100]!r} is not a valid name")
        if self.absolute_path and not value.startswith("/"):
            raise ApiError(400, f"{self.name}: must be an absolute path on the appliance, got {value[:100]!r}")
        if self.items is not None:
            return [replace(self.items, name=f"{self.name}[{i}]").check(v) for i, v in enumerate(value)]
        return value


# The fields the API and the page's forms share, one rule each. Ranges (timeout, memory) and what a path or
# pattern may be are the daemon's to check: it answers with a UsageError naming the field (400).
VM = Field("vm", str, pattern=NAME)
VMS = Field("vms", list, items=Field("vms", str, pattern=NAME))
POINT = Field("point", str, default="latest", pattern=NAME)
MODE = Field("mode", str, choices=("instant", "sandbox"), default="instant")
REPOSITORY = Field("repository", str, pattern=NAME)
CACHE = Field("cache", str, absolute_path=True)
EXPECT = Field("expect", str, max_length=500)
TIMEOUT = Field("timeout", (int, float), default=300)
MEMORY_MIB = Field("memory_mib", int, default=1024)
OUTPUT = Field("output", str, required=True, absolute_path=True)
OVERWRITE = Field("overwrite", bool, default=False)
TOKEN_NAME = Field("name", str, required=True, max_length=64)


def json_object() -> dict[str, Any]:
    """The request's JSON object as sent (an empty body: {}); one answer each for a body that is not JSON, not
    an object, or nested too deeply."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # json raises it, not ValueError, for arrays nested thousands deep
        raise ApiError(400, "body: JSON nested too deeply") from None
    if body is None:
        if request.content_length and not request.is_json:
            raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'")
        if request.content_length:
            raise ApiError(400, "body: not valid JSON")
        body = {}
    if not isinstance(body, dict):
        raise ApiError(400, f"body: expected a JSON object, got {_json_type(body)}")
    return body


def json_body(*fields: Field) -> dict[str, Any]:
    """The request's JSON object, checked against ``fields``; unknown fields are refused, not ignored."""
    body = json_object()
    known = {f.name: f for f in fields}
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unknown field (known: {', '.join(known)})")
    out = {}
    for f in fields:
        if f.name in body and body[f.name] is not None:
            out[f.name] = f.check(body[f.name])
        elif f.required:
            raise ApiError(400, f"{f.name}: required")
        else:
            out[f.name] = f.default
    return out


def form_fields(*fields: Field) -> dict[str, Any]:
    """The page's form fields, checked by the same rules as the API's JSON fields (an empty field is absent)."""
    out = {}
    for f in fields:
        value = request.form.get(f.name, "").strip()
        if value:
            out[f.name] = f.check(value)
        elif f.required:
            raise ApiError(400, f"{f.name}: required")
        else:
            out[f.name] = f.default
    return out


def check_path_params(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Every <param> in a URL is a name (session, job, token, repository ids): refuse anything else early."""
    for key, value in (values or {}).items():
        if isinstance(value, str) and not NAME.fullmatch(value):
            raise ApiError(400, f"{key}: {value[:100]!r} is not a valid name or id")


def query_flag(name: str) -> bool:
    value = request.args.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ApiError(400, f"{name}: expected true or false, got {value!r}")
    return value in ("true", "1", "yes")


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(
        {
            str: "a string",
            bool: "true/false",
            int: "an integer",
            list: "a list",
            dict: "an object",
            float: "a number",
        }.get(k, k.__name__)
        for k in kinds
    )


def _json_type(value: Any) -> str:
    return {
        bool: "true/false",
        str: "a string",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)
