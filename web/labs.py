"""Virtual labs on the web: the API under /api/v1/labs and /api/v1/lab-groups, and the page /labs.

Both call the daemon's lab operations over the control socket (appliance/lab/service.py ``Labs.ops``); the
group document itself is checked by ``appliance.lab.group.parse_group``, the one place for its rules, whose
errors name the field. A lab's screenshots and console logs are files in STATE/labs/ID/: they are read here
through directory descriptors with O_NOFOLLOW, and only the files the lab's own record names, so no id, VM
name or symlink in that directory leads anywhere else.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from flask import Blueprint, Response, current_app, flash, redirect, render_template, request, url_for

from appliance.lab.group import parse_group
from web import daemon
from web.pages import act
from web.security import api_auth, login_required
from web.validation import NAME, ApiError, Field, check_path_params, form_fields, json_body, json_object

api = Blueprint("labs_api", __name__, url_prefix="/api/v1")
api.url_value_preprocessor(check_path_params)
page = Blueprint("labs", __name__)
page.url_value_preprocessor(check_path_params)

KINDS = ("verification", "sandbox")
LIVE = ("verifying", "starting", "running")
MAX_DOWNLOAD = 16 << 20  # a screenshot or console log larger than this is not a lab's (consoles keep 1 MiB)

GROUP = Field("group", (str, dict), required=True)
KIND = Field("kind", str, choices=KINDS, default="verification")
TTL = Field("ttl", (str, int), default="4h", max_length=20)
GROUP_TEXT = Field("group", str, required=True, max_length=256 << 10)
MAX_GROUP_DEPTH = 20  # a group document is four levels deep (group, vms, vm, checks)


def _group_ref(value: str | dict[str, Any]) -> str | dict[str, Any]:
    """A defined group's name, or a whole group document (checked here so the error names its field)."""
    if isinstance(value, str):
        if not NAME.fullmatch(value):
            raise ApiError(400, f"group: {value[:100]!r} is not a valid group name")
        return value
    parse_group(value)
    return value


def start_lab(group: str | dict[str, Any], kind: str, ttl: str | int) -> dict[str, Any]:
    if kind == "sandbox":
        return daemon.call("lab_start", group=group, ttl=ttl)
    return daemon.call("lab_verify", group=group)


# --- files of a lab -------------------------------------------------------------------------------------
def _vm_doc(record: dict[str, Any], vm: str) -> dict[str, Any]:
    for doc in (record.get("report") or {}).get("vms", []):
        if doc.get("vm") == vm:
            return doc
    known = ", ".join(d.get("vm", "?") for d in (record.get("report") or {}).get("vms", [])) or "none"
    raise ApiError(404, f"lab {record['id']} has no VM {vm!r} (its VMs: {known})")


def read_lab_file(lab_id: str, recorded: object, what: str) -> bytes:
    """The bytes of a file the lab's record names, which must be a regular file directly in STATE/labs/ID/.
    Opened component by component with O_NOFOLLOW from the state directory: a symlink anywhere is refused."""
    if not isinstance(recorded, str) or not recorded:
        raise ApiError(404, f"lab {lab_id} has no {what} (yet)")
    labs = Path(current_app.config["STATE_DIR"]) / "labs"
    path = Path(recorded)
    if path.parent != labs / lab_id or path.name in ("", ".", ".."):
        raise ApiError(404, f"lab {lab_id}: its {what} {recorded!r} is not in the lab's directory")
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fds: list[int] = []
    try:
        fds.append(os.open(labs, nofollow | os.O_DIRECTORY))
        fds.append(os.open(lab_id, nofollow | os.O_DIRECTORY, dir_fd=fds[-1]))
        fds.append(os.open(path.name, nofollow | os.O_NONBLOCK, dir_fd=fds[-1]))
        st = os.fstat(fds[-1])
        if not stat.S_ISREG(st.st_mode):
            raise ApiError(404, f"lab {lab_id}: its {what} is not a regular file")
        if st.st_size > MAX_DOWNLOAD:
            raise ApiError(413, f"lab {lab_id}: its {what} is {st.st_size} bytes, more than {MAX_DOWNLOAD}")
        with os.fdopen(os.dup(fds[-1]), "rb") as f:
            return f.read(MAX_DOWNLOAD)
    except FileNotFoundError:
        raise ApiError(404, f"lab {lab_id}: its {what} is gone") from None
    except OSError as exc:
        raise ApiError(404, f"lab {lab_id}: its {what} cannot be read: {exc.strerror}") from None
    finally:
        for fd in fds:
            os.close(fd)


def screenshot(lab_id: str, vm: str) -> Response:
    doc = _vm_doc(daemon.call("lab", id=lab_id), vm)
    data = read_lab_file(lab_id, doc.get("screenshot"), f"screenshot of {vm}")
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ApiError(404, f"lab {lab_id}: the screenshot of {vm} is not a PNG")
    return Response(data, mimetype="image/png", headers={"Cache-Control": "no-store"})


def console(lab_id: str, vm: str) -> Response:
    doc = _vm_doc(daemon.call("lab", id=lab_id), vm)
    data = read_lab_file(lab_id, doc.get("console_log"), f"console log of {vm}")
    name = f"lab-{lab_id}-{vm}-console.log"
    return Response(
        data,
        mimetype="text/plain",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
    )


# --- API ------------------------------------------------------------------------------------------------
@api.get("/lab-groups")
@api_auth
def groups() -> Response:
    return _json(daemon.call("lab_groups"))


@api.post("/lab-groups")
@api_auth
def define() -> tuple[Response, int]:
    """The body is the group document itself (name, network, at, vms)."""
    body = json_object()  # the same answers as elsewhere for a non-JSON, non-object or too deep body
    if not body and not request.content_length:
        raise ApiError(400, "body: a group document (an object with 'name' and 'vms')")
    parse_group(body)
    return _json(daemon.call("lab_define", group=body)), 201


@api.get("/lab-groups/<name>")
@api_auth
def group(name: str) -> Response:
    for g in daemon.call("lab_groups"):
        if g.get("name") == name:
            return _json(g)
    raise ApiError(404, f"no lab group {name!r}")


@api.delete("/lab-groups/<name>")
@api_auth
def remove_group(name: str) -> Response:
    return _json(daemon.call("lab_group_remove", name=name))


@api.get("/labs")
@api_auth
def labs() -> Response:
    return _json(daemon.call("lab_list"))


@api.post("/labs")
@api_auth
def start() -> tuple[Response, int]:
    body = json_body(GROUP, KIND, TTL)
    if body["kind"] == "verification" and "ttl" in (request.get_json(silent=True) or {}):
        raise ApiError(400, "ttl: only a sandbox lab has one (a verification ends by itself)")
    return _json(start_lab(_group_ref(body["group"]), body["kind"], body["ttl"])), 202


@api.get("/labs/<lab_id>")
@api_auth
def lab(lab_id: str) -> Response:
    return _json(daemon.call("lab", id=lab_id))


@api.delete("/labs/<lab_id>")
@api_auth
def stop(lab_id: str) -> Response:
    return _json(daemon.call("lab_stop", id=lab_id))


@api.get("/labs/<lab_id>/vms/<vm>/screenshot")
@api_auth
def lab_screenshot(lab_id: str, vm: str) -> Response:
    return screenshot(lab_id, vm)


@api.get("/labs/<lab_id>/vms/<vm>/console")
@api_auth
def lab_console(lab_id: str, vm: str) -> Response:
    return console(lab_id, vm)


def _json(doc: Any) -> Response:
    return Response(json.dumps(doc), mimetype="application/json")


# --- page -----------------------------------------------------------------------------------------------
@page.get("/labs")
@login_required
def index() -> Any:
    ctx: dict[str, Any] = {"error": None, "groups": [], "labs": []}
    try:
        ctx["groups"] = daemon.call("lab_groups")
        ctx["labs"] = daemon.call("lab_list")
    except ApiError as exc:
        ctx["error"] = exc.message
    return render_template("labs.html", live=LIVE, **ctx)


@page.get("/labs/<lab_id>")
@login_required
def detail(lab_id: str) -> Any:
    try:
        record = daemon.call("lab", id=lab_id)
    except ApiError as exc:
        flash(exc.message, "error")
        return redirect(url_for("labs.index"))
    return render_template("lab.html", lab=record, live=LIVE)


def group_yaml(text: str) -> Any:
    """A pasted group document. YAML aliases are refused before anything is built: nine lines of them expand
    to 10^9 items when the document is turned into JSON, and one may refer to itself; nesting is bounded (the
    composer recurses)."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ApiError(400, f"group: YAML aliases (*{event.anchor}) are not accepted; write the values out")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_GROUP_DEPTH:
                    raise ApiError(400, f"group: nested more than {MAX_GROUP_DEPTH} deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ApiError(400, f"group: not YAML or JSON: {exc}") from None


@page.post("/labs/groups")
@login_required
def define_group() -> Response:
    def run() -> str:
        doc = group_yaml(form_fields(GROUP_TEXT)["group"])
        if not isinstance(doc, dict):
            raise ApiError(400, "group: a mapping with 'name' and 'vms'")
        doc = json.loads(json.dumps(doc, default=str))  # YAML times become the strings the daemon parses
        parse_group(doc)
        g = daemon.call("lab_define", group=doc)
        return f"Group {g['name']} saved: {' → '.join(v['vm'] for v in g['vms'])}."

    return act(run, "Could not save the group", "labs.index")


@page.post("/labs/groups/<name>/remove")
@login_required
def remove_group_form(name: str) -> Response:
    def run() -> str:
        daemon.call("lab_group_remove", name=name)
        return f"Group {name} removed."

    return act(run, f"Could not remove {name}", "labs.index")


@page.post("/labs")
@login_required
def start_form() -> Response:
    record: dict[str, Any] = {}

    def run() -> str:
        f = form_fields(
            Field("group", str, required=True, pattern=NAME), KIND, Field("ttl", str, default="4h", max_length=20)
        )
        record.update(start_lab(f["group"], f["kind"], f["ttl"]))
        return f"Lab {record['id']} of {record['group']} started ({record['kind']})."

    response = act(run, f"Could not start {request.form.get('group', '')[:100]}", "labs.index")
    if record:
        return redirect(url_for("labs.detail", lab_id=record["id"]))
    return response


@page.post("/labs/<lab_id>/stop")
@login_required
def stop_form(lab_id: str) -> Response:
    def run() -> str:
        record = daemon.call("lab_stop", id=lab_id)
        return f"Lab {lab_id} {record['state']}."

    return act(run, f"Could not stop {lab_id}", "labs.index")


# --- OpenAPI --------------------------------------------------------------------------------------------
def openapi_paths() -> dict[str, Any]:
    """The labs' entries of /api/v1/openapi.json (web/openapi.py merges them)."""
    obj, lst = {"type": "object"}, {"type": "array", "items": {"type": "object"}}
    name = {"type": "string", "pattern": NAME.pattern}

    def op(summary: str, schema: dict, *, code: str = "200", body: dict | None = None, params: tuple = ()) -> dict:
        doc: dict[str, Any] = {
            "summary": summary,
            "responses": {code: {"description": "OK", "content": {"application/json": {"schema": schema}}}},
            "parameters": [{"name": p, "in": "path", "required": True, "schema": name} for p in params],
        }
        if body is not None:
            doc["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        return doc

    def download(summary: str, mime: str) -> dict:
        doc = op(summary, obj, params=("lab_id", "vm"))
        doc["responses"]["200"] = {"description": "OK", "content": {mime: {}}}
        return doc

    start_body = {
        "type": "object",
        "required": ["group"],
        "additionalProperties": False,
        "properties": {
            "group": {"oneOf": [name, obj], "description": "a defined group's name, or a group document"},
            "kind": {"enum": list(KINDS), "default": "verification"},
            "ttl": {"type": "string", "default": "4h", "description": "sandbox only: 30m, 4h, 2d (at most 7d)"},
        },
    }
    return {
        "/api/v1/lab-groups": {
            "get": op("Application groups", lst),
            "post": op("Define (or replace) a group: name, network, at, vms", obj, code="201", body=obj),
        },
        "/api/v1/lab-groups/{name}": {
            "get": op("One group", obj, params=("name",)),
            "delete": op("Remove a group", obj, params=("name",)),
        },
        "/api/v1/labs": {
            "get": op("Labs, newest first, with per-VM progress", lst),
            "post": op("Start a verification or a sandbox lab", obj, code="202", body=start_body),
        },
        "/api/v1/labs/{lab_id}": {
            "get": op("One lab's live record", obj, params=("lab_id",)),
            "delete": op("Stop a lab: its guests and sandboxes are thrown away", obj, params=("lab_id",)),
        },
        "/api/v1/labs/{lab_id}/vms/{vm}/screenshot": {"get": download("A VM's screenshot", "image/png")},
        "/api/v1/labs/{lab_id}/vms/{vm}/console": {"get": download("A VM's console log", "text/plain")},
    }
