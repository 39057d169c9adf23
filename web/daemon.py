"""The web app's way to the daemon: the control socket, with domain errors mapped to HTTP statuses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import current_app, g

from appliance import errors
from appliance.sessions.control import ControlClient
from web.validation import ApiError

# Most specific first: the first class an error is an instance of decides the status.
STATUS_OF = (
    (errors.SessionNotFoundError, 404),
    (errors.RestorePointNotFoundError, 404),
    (errors.FileNotFoundInBackupError, 404),
    (errors.FileRecoveryError, 400),
    (errors.ItemRecoveryError, 400),
    (errors.UsageError, 400),
    (errors.ConfigError, 400),
    (errors.NoSpaceError, 507),
    (errors.LimitExceededError, 429),
    (errors.SessionError, 409),
    (errors.RepositoryLockedError, 409),
    (errors.DaemonNotRunningError, 503),
    (errors.IntegrityError, 500),
)


def call(op: str, **params: Any) -> Any:
    try:
        with domain_errors():
            return ControlClient(current_app.config["STATE_DIR"], timeout=60).call(op, **params)
    except OSError as exc:
        raise ApiError(503, f"the bootback daemon did not answer: {exc}") from None


def status() -> dict:
    """The daemon's status, asked once per request (the page and its banner both need it)."""
    if "daemon_status" not in g:
        try:
            g.daemon_status = call("status")
        except ApiError as exc:
            g.daemon_status = exc  # a daemon that is down is asked once, not once per use
    if isinstance(g.daemon_status, ApiError):
        raise g.daemon_status
    return g.daemon_status


@contextmanager
def domain_errors() -> Iterator[None]:
    """Domain errors of the appliance services the web calls (the daemon, file recovery) become ApiErrors
    with their HTTP status, which the app's one error handler answers."""
    try:
        yield
    except errors.BootbackError as exc:
        raise translate(exc) from None


def translate(exc: errors.BootbackError) -> ApiError:
    """The HTTP status of a domain error, the same for the daemon's errors and the web app's own."""
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return ApiError(status, str(exc))
    return ApiError(500, str(exc))


def repository(name: str) -> dict:
    """A repository the daemon serves, by name (404 otherwise)."""
    for repo in call("repositories"):
        if repo["name"] == name:
            return repo
    raise ApiError(404, f"no repository named {name!r}")
