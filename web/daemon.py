"""The web app's way to the daemon: the control socket, with domain errors mapped to HTTP statuses."""

from __future__ import annotations

from typing import Any

from flask import current_app

from appliance import errors
from appliance.sessions.control import ControlClient
from web.validation import ApiError

# Most specific first: the first class an error is an instance of decides the status.
STATUS_OF = (
    (errors.SessionNotFoundError, 404),
    (errors.RestorePointNotFoundError, 404),
    (errors.UsageError, 400),
    (errors.ConfigError, 400),
    (errors.NoSpaceError, 507),
    (errors.SessionError, 409),
    (errors.RepositoryLockedError, 409),
    (errors.DaemonNotRunningError, 503),
    (errors.IntegrityError, 500),
)


def call(op: str, **params: Any) -> Any:
    try:
        return ControlClient(current_app.config["STATE_DIR"], timeout=60).call(op, **params)
    except errors.BootbackError as exc:
        for cls, status in STATUS_OF:
            if isinstance(exc, cls):
                raise ApiError(status, str(exc)) from None
        raise ApiError(500, str(exc)) from None
    except OSError as exc:
        raise ApiError(503, f"the bootback daemon did not answer: {exc}") from None
