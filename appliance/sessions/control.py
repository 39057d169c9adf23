"""The control socket: JSON lines over a Unix socket in the state directory.

The CLI and the web app (gunicorn workers) are its clients; the daemon, which owns the sessions and the NFS
server, is its server. One request object per line, one response object per line:
``{"op": "publish", "params": {...}}`` -> ``{"result": ...}`` or ``{"error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import errors
from appliance.errors import BootbackError, DaemonNotRunningError

if TYPE_CHECKING:
    import asyncio

# The server's asyncio and inspect are imported where it runs: a client (every CLI command) starts without them.

log = logging.getLogger("bootback.control")
SOCKET_NAME = "control.sock"
MAX_REQUEST = 1 << 20


class ControlServer:
    def __init__(self, state_dir: Path, ops: dict[str, Callable[..., Any]]) -> None:
        self.path = Path(state_dir) / SOCKET_NAME
        self.ops = ops
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        import asyncio

        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, _error("UsageError", f"request larger than {MAX_REQUEST} bytes"))
                    break
                if not line:
                    break
                await self._send(writer, await self._dispatch(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, doc: dict) -> None:
        writer.write(json.dumps(doc, default=str).encode() + b"\n")
        await writer.drain()

    async def _dispatch(self, line: bytes) -> dict:
        import asyncio
        import inspect

        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ValueError("a request is an object with a string 'op'")
            params = req.get("params")
            params = {} if params is None else params
            if not isinstance(params, dict):
                raise ValueError("'params' must be an object")
        except ValueError as exc:
            return _error("UsageError", f"malformed request: {exc}")
        fn = self.ops.get(req["op"])
        if fn is None:
            return _error("UsageError", f"unknown operation {req['op']!r}; known: {', '.join(sorted(self.ops))}")
        try:
            inspect.signature(fn).bind(**params)  # only a caller's wrong parameters are "bad parameters" ...
        except TypeError as exc:
            return _error("UsageError", f"bad parameters for {req['op']}: {exc}")
        try:
            return {"result": await asyncio.to_thread(fn, **params)}
        except BootbackError as exc:
            return _error(type(exc).__name__, str(exc))
        except Exception as exc:  # noqa: BLE001 - the daemon keeps serving; the client gets the message
            log.exception("control operation %s failed", req["op"])  # ... a bug inside one is logged as such
            return _error("BootbackError", f"{req['op']} failed: {exc}")


def _error(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


class ControlClient:
    def __init__(self, state_dir: Path | str, timeout: float = 120.0) -> None:
        self.path = Path(state_dir) / SOCKET_NAME
        self.timeout = timeout

    def call(self, op: str, **params: Any) -> Any:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            raise DaemonNotRunningError(
                f"no bootback daemon answers at {self.path}; start one with 'bootback serve' (or pass --state)"
            ) from None
        with s:
            s.sendall(json.dumps({"op": op, "params": params}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise DaemonNotRunningError("the daemon closed the control connection")
                buf += chunk
        doc = json.loads(buf)
        if "error" in doc:
            cls = getattr(errors, doc["error"].get("type", ""), None)
            if not (isinstance(cls, type) and issubclass(cls, BootbackError)):
                cls = BootbackError
            raise cls(doc["error"]["message"])
        return doc["result"]
