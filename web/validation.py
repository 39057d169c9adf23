"""Request validation for the API: every error names the offending field."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flask import request

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,199}$")


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

    def check(self, value: Any) -> Any:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        # bool is an int in Python; JSON true must not pass for a number or vice versa.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ApiError(400, f"{self.name}: expected {_kind_name(kinds)}, got {_json_type(value)}")
        if self.choices and value not in self.choices:
            raise ApiError(400, f"{self.name}: must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.pattern is not None and not self.pattern.match(value):
            raise ApiError(400, f"{self.name}: {value!r} is not a valid name")
        if self.absolute_path and not value.startswith("/"):
            raise ApiError(400, f"{self.name}: must be an absolute path on the appliance, got {value!r}")
        return value


def json_body(*fields: Field) -> dict[str, Any]:
    """The request's JSON object, checked against ``fields``; unknown fields are refused, not ignored."""
    body = request.get_json(silent=True)
    if body is None:
        if request.content_length and not request.is_json:
            raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'")
        if request.content_length:
            raise ApiError(400, "body: not valid JSON")
        body = {}
    if not isinstance(body, dict):
        raise ApiError(400, f"body: expected a JSON object, got {_json_type(body)}")
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


def query_flag(name: str) -> bool:
    value = request.args.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ApiError(400, f"{name}: expected true or false, got {value!r}")
    return value in ("true", "1", "yes")


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join({str: "a string", bool: "true/false", int: "an integer", list: "a list",
                        dict: "an object", float: "a number"}.get(k, k.__name__) for k in kinds)  # fmt: skip


def _json_type(value: Any) -> str:
    return {bool: "true/false", str: "a string", int: "a number", float: "a number", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)  # fmt: skip
