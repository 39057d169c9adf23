"""File-level recovery for the API and the page: browse and download files inside a restore point's disk.

The web app reads the repository itself here (read-only, through appliance.files), instead of asking the
daemon: downloads are streams, and the control socket carries JSON lines."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from urllib.parse import quote

from flask import Response, request

from appliance.files import FileBrowser, browse
from appliance.repo import Repository
from appliance.repo.backends import repository_arg
from appliance.repo.reader import ChunkCache
from web import daemon
from web.validation import NAME, ApiError

_repos: dict[str, Repository] = {}  # by the name the daemon serves it under
_lock = threading.Lock()
CACHE_BYTES = 64 << 20  # the page reads few chunks; the daemon keeps the big cache
PIECE = 1 << 20


def query() -> tuple[str, str | None, str]:
    """The (point, disk, path) query parameters, checked."""
    point = request.args.get("point", "")
    if not NAME.fullmatch(point):
        raise ApiError(400, f"point: expected VM or VM@POINT, got {point!r}")
    disk = request.args.get("disk") or None
    if disk is not None and not NAME.fullmatch(disk):
        raise ApiError(400, f"disk: {disk!r} is not a valid disk name")
    path = request.args.get("path", "/")
    if not path.startswith("/") or len(path) > 4096 or "\x00" in path:
        raise ApiError(400, f"path: expected an absolute path such as /p1/etc, got {path[:100]!r}")
    return point, disk, path


def _repository(name: str) -> Repository:
    """The served repository NAME, opened once per web worker. Only a name not seen yet costs a
    'repositories' call to the daemon (which reads every restore point's summary, not its chunk lists)."""
    with _lock:
        repo = _repos.get(name)
    if repo is None:
        path = daemon.repository(name)["path"]
        with _lock:
            repo = _repos.get(name)
            if repo is None:
                with daemon.domain_errors():  # the daemon's key options reach us as BOOTBACK_KEY_FILE/PASSPHRASE
                    repo = _repos[name] = Repository.open(repository_arg(path))
                repo.chunk_cache = ChunkCache(CACHE_BYTES)
    return repo


def _browser(repo_name: str, point: str, disk: str | None) -> tuple[FileBrowser, str, str]:
    repo = _repository(repo_name)
    with daemon.domain_errors():
        rp = repo.resolve(point)
        browser = browse(repo, rp, disk)
    return browser, rp.ref, browser.reader.disk.name


def listing(repo_name: str, point: str, disk: str | None, path: str) -> dict:
    browser, ref, disk_name = _browser(repo_name, point, disk)
    with daemon.domain_errors():
        doc = {
            "repository": repo_name,
            "point": ref,
            "disk": disk_name,
            "path": path,
            "entries": [e.to_json() for e in browser.listdir(path)],
        }
        if FileBrowser.split(path)[0] is None:
            doc["volumes"] = [v.to_json() for v in browser.volumes()]
    return doc


def download(repo_name: str, point: str, disk: str | None, path: str) -> Response:
    browser, _, _ = _browser(repo_name, point, disk)
    with daemon.domain_errors():
        entry = browser.stat(path)
        name = path.rstrip("/").rsplit("/", 1)[-1] or "disk"
        if entry.kind == "file":
            fh = browser.open(path)
            body, mimetype, size = _pieces(fh), "application/octet-stream", entry.size
        elif entry.kind == "directory":
            body, mimetype, size, name = _tar(browser, path), "application/x-tar", None, f"{name}.tar"
        else:
            raise ApiError(400, f"path: {path} is a {entry.kind}, not a file or directory")
    headers = {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}"}
    if size is not None:
        headers["Content-Length"] = str(size)
    return Response(body, mimetype=mimetype, headers=headers)


def _pieces(fh) -> Iterator[bytes]:  # noqa: ANN001
    with fh:
        while piece := fh.read(PIECE):
            yield piece


class _QueueWriter:
    """A file object for tarfile whose writes go to a bounded queue the response reads from."""

    def __init__(self, q: queue.Queue) -> None:
        self.q = q

    def write(self, data: bytes) -> int:
        self.q.put(bytes(data), timeout=300)  # a client gone for minutes ends the producer (queue.Full)
        return len(data)


def _tar(browser: FileBrowser, path: str) -> Iterator[bytes]:
    q: queue.Queue = queue.Queue(maxsize=16)
    failed: list[BaseException] = []

    def produce() -> None:
        try:
            browser.write_tar(path, _QueueWriter(q))
        except BaseException as exc:  # noqa: BLE001 - reported by ending the stream short
            failed.append(exc)
        finally:
            try:
                q.put(None, timeout=300)
            except queue.Full:
                pass

    threading.Thread(target=produce, daemon=True, name="tar").start()
    while (data := q.get()) is not None:
        yield data
    if failed:
        # Headers are sent: the only honest signal left is a truncated stream (tar readers report it).
        raise RuntimeError(f"download of {path} failed: {failed[0]}")
