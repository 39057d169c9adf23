"""The OpenAPI 3.1 document of /api/v1, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

from appliance import __version__
from web.backup_items import openapi_paths as item_restore_paths
from web.labs import openapi_paths as lab_paths
from web.validation import MAX_ITEMS, MAX_STRING, NAME


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": _json(_ref("Error"), "Invalid request; the message names the field"),
    "401": _json(_ref("Error"), "Not authenticated"),
    "404": _json(_ref("Error"), "Unknown id"),
}


def _op(summary: str, ok: dict, *, body: dict | None = None, params: list | None = None, code: str = "200") -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": {code: ok, **ERRORS}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": NAME_SCHEMA}


OBJ = {"type": "object"}
NAME_SCHEMA = {"type": "string", "pattern": NAME.pattern}
ABS_PATH = {
    "type": "string",
    "pattern": "^/",
    "maxLength": MAX_STRING,
    "description": "an absolute path on the appliance",
}
TEXT = {"description": "text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}
SESSIONS = {"type": "array", "items": {"$ref": "#/components/schemas/Session"}}
LIST = {"type": "array", "items": OBJ}
BINARY = {
    "description": "the file's bytes, or a tar stream of the directory",
    "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
    },
}


def ITEM_PATHS(repo: dict) -> dict:  # noqa: N802 - application item recovery (web/backup_items.py)
    point = {"name": "point", "in": "query", "required": True, "schema": NAME_SCHEMA, "description": "VM or VM@POINT"}
    path = {
        "name": "path",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "which data directory, when there are several (as listed)",
    }
    text = {"type": "string", "maxLength": 200}
    db = {"name": "db", "in": "query", "required": False, "schema": text, "description": "only this database"}
    dump = {"name": "dump", "in": "query", "required": True, "schema": text, "description": "DB or DB.[SCHEMA.]TABLE"}
    count = {"name": "count", "in": "query", "required": False, "schema": {"type": "string", "enum": ["1", "0"]}}
    specs = {**dump, "schema": {"type": "array", "items": text, "maxItems": 64}, "description": dump["description"]}
    ldap = {"name": "filter", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 1000}}
    day = {"type": "string", "format": "date"}
    mail = [
        *({"name": n, "in": "query", "required": False, "schema": text} for n in ("folder", "from", "subject")),
        *({"name": n, "in": "query", "required": False, "schema": day} for n in ("since", "until")),
        {"name": "id", "in": "query", "required": False, "schema": {"type": "array", "items": text, "maxItems": 64}},
    ]
    fmt = {"name": "format", "in": "query", "required": False, "schema": {"type": "string", "enum": ["mbox", "eml"]}}
    base = "/api/v1/repositories/{name}/items"
    paths = {
        base: {
            "get": _op(
                "Applications inside a restore point (kind, disk, volume, path, version)",
                _json(OBJ),
                params=[repo, point, path],
            )
        },
        f"{base}/openldap/entries": {
            "get": _op(
                "Entries of a backed-up OpenLDAP database (DN, objectClass): the first 1000, with total and truncated",
                _json(OBJ),
                params=[repo, point, path, ldap],
            )
        },
        f"{base}/openldap/export": {"get": _op("Matching entries as LDIF", BINARY, params=[repo, point, path, ldap])},
        f"{base}/mail/messages": {
            "get": _op(
                "Messages of a backed-up Maildir or mbox: the first 1000, with total and truncated",
                _json(OBJ),
                params=[repo, point, path, *mail],
            )
        },
        f"{base}/mail/export": {
            "get": _op("Matching messages as mbox, or one as .eml", BINARY, params=[repo, point, path, *mail, fmt])
        },
    }
    for kind, what in (("postgres", "PostgreSQL cluster"), ("mariadb", "MariaDB/MySQL data directory")):
        paths[f"{base}/{kind}/databases"] = {
            "get": _op(f"Databases of a backed-up {what}", _json(OBJ), params=[repo, point, path])
        }
        paths[f"{base}/{kind}/tables"] = {
            "get": _op(
                f"Tables (and exact row counts) of a backed-up {what}",
                _json(OBJ),
                params=[repo, point, path, db, count],
            )
        }
        paths[f"{base}/{kind}/dump"] = {
            "get": _op(
                f"A database, or tables of one, of a backed-up {what} as SQL", BINARY, params=[repo, point, path, specs]
            )
        }
    return paths


def FILE_QUERY(repo: dict) -> list[dict]:  # noqa: N802 - reads like the constant lists above
    return [
        repo,
        {"name": "point", "in": "query", "required": True, "schema": NAME_SCHEMA, "description": "VM or VM@POINT"},
        {
            "name": "disk",
            "in": "query",
            "required": False,
            "schema": NAME_SCHEMA,
            "description": "disk name, when the restore point has several",
        },
        {
            "name": "path",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "pattern": "^/", "maxLength": 4096, "default": "/"},
            "description": "/ lists the volumes; /p1/etc is a directory of the first partition",
        },
    ]


def openapi_document() -> dict:
    sid, repo = _path_param("sid"), _path_param("name")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bootback appliance API",
            "version": __version__,
            "description": "Run VMs straight from backups over NFS. Authenticate with "
            "'Authorization: Bearer <token>' (bootback token create NAME).",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/health": {"get": {**_op("Liveness and daemon reachability", _json(OBJ)), "security": []}},
            "/api/v1/status": {
                "get": _op(
                    "Ports, export, cache and clients; nfs_open_to_everyone (true, false or null "
                    "when the daemon does not say) and warnings, a list of sentences for people",
                    _json(OBJ),
                )
            },
            "/api/v1/metrics": {"get": _op("Prometheus metrics", TEXT)},
            "/api/v1/openapi.json": {"get": _op("This document", _json(OBJ))},
            "/api/v1/exports": {"get": _op("NFS exports", _json(LIST))},
            "/api/v1/clients": {"get": _op("Connected NFS clients", _json(LIST))},
            "/api/v1/cache": {"get": _op("Write cache space and per-session use", _json(OBJ))},
            "/api/v1/repositories": {
                "get": _op("Repositories served", _json({"type": "array", "items": _ref("Repository")}))
            },
            "/api/v1/repositories/{name}": {"get": _op("One repository", _json(_ref("Repository")), params=[repo])},
            "/api/v1/repositories/{name}/points": {
                "get": _op(
                    "Restore points, oldest first; a point file that cannot be read is listed with damaged: true and "
                    "the error (publishing or browsing it, or 'latest' while it is the newest, is refused)",
                    _json({"type": "array", "items": _ref("RestorePoint")}),
                    params=[repo, {"name": "vm", "in": "query", "required": False, "schema": NAME_SCHEMA}],
                )
            },
            "/api/v1/repositories/{name}/files": {
                "get": _op(
                    "List the volumes (path /) or a directory inside a backed-up disk",
                    _json(OBJ),
                    params=FILE_QUERY(repo),
                )
            },
            "/api/v1/repositories/{name}/files/content": {
                "get": _op("Download a file, or a directory as tar", BINARY, params=FILE_QUERY(repo))
            },
            **ITEM_PATHS(repo),
            **item_restore_paths(repo),
            **lab_paths(),
            "/api/v1/sessions": {
                "get": _op("Sessions", _json(SESSIONS)),
                "post": _op(
                    "Start instant recovery or sandbox sessions",
                    _json(SESSIONS, "Created"),
                    body=_ref("PublishRequest"),
                    code="201",
                ),
            },
            "/api/v1/sessions/{sid}": {
                "get": _op("One session", _json(_ref("Session")), params=[sid]),
                "delete": _op(
                    "Stop a session (a sandbox's writes are discarded)",
                    _json(OBJ),
                    params=[
                        sid,
                        {
                            "name": "force",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "boolean"},
                            "description": "stop an instant session whose changes were not migrated",
                        },
                    ],
                ),
            },
            "/api/v1/sessions/{sid}/prefetch": {
                "post": _op(
                    "Warm the session's disks into the local read cache in the background (progress: the "
                    "session's prefetch field)",
                    _json(_ref("Session"), "Started"),
                    params=[sid],
                    code="202",
                ),
            },
            "/api/v1/sessions/{sid}/migration": {
                "get": _op("Migration progress", _json(_ref("Migration")), params=[sid]),
                "post": _op(
                    "Copy the running VM's disks out (backup + changes)",
                    _json(_ref("Migration"), "Started"),
                    params=[sid],
                    body={
                        "type": "object",
                        "required": ["output"],
                        "additionalProperties": False,
                        "properties": {
                            "output": ABS_PATH,
                            "overwrite": {
                                "type": "boolean",
                                "default": False,
                                "description": "replace an existing output file (else 400)",
                            },
                        },
                    },
                    code="202",
                ),
            },
            "/api/v1/verifications": {
                "get": _op(
                    "Backup verifications, newest first", _json({"type": "array", "items": _ref("Verification")})
                ),
                "post": _op(
                    "Verify a backup: boot it as a sandbox without network and check its console",
                    _json(_ref("Verification"), "Started"),
                    body=_ref("VerifyRequest"),
                    code="202",
                ),
            },
            "/api/v1/verifications/{vid}": {
                "get": _op("One verification", _json(_ref("Verification")), params=[_path_param("vid")])
            },
            "/api/v1/tokens": {
                "get": _op("API tokens (without their secrets)", _json(LIST)),
                "post": _op(
                    "Create an API token (its secret is shown once)",
                    _json(OBJ, "Created"),
                    code="201",
                    body={
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64}},
                    },
                ),
            },
            "/api/v1/tokens/{token_id}": {
                "delete": _op("Revoke an API token", _json(OBJ), params=[_path_param("token_id")])
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {"status": {"type": "integer"}, "message": {"type": "string"}},
                        }
                    },
                },
                "Repository": {
                    "type": "object",
                    "required": ["name", "path", "points"],
                    "properties": {
                        "name": {"type": "string"},
                        "path": {"type": "string"},
                        "chunk_size": {"type": "integer"},
                        "encryption": {"type": "string", "description": "aes-256-gcm, or none (not encrypted)"},
                        "vms": {"type": "array", "items": {"type": "string"}},
                        "points": {"type": "integer", "description": "readable restore points"},
                        "damaged_points": {
                            "type": "array",
                            "items": _ref("RestorePoint"),
                            "description": "point files that cannot be read (damaged: true)",
                        },
                        "error": {"type": "string", "description": "present when the repository cannot be listed"},
                    },
                },
                "RestorePoint": {
                    "type": "object",
                    "required": ["vm", "id", "damaged"],
                    "properties": {
                        "vm": {"type": "string"},
                        "id": {"type": "string"},
                        "damaged": {"type": "boolean"},
                        "error": {
                            "type": "string",
                            "description": "why a damaged point cannot be read; its other "
                            "facts are absent, never guessed",
                        },
                        "time": {"type": "string"},
                        "disks": LIST,
                        "has_vmx": {"type": "boolean"},
                        "source": OBJ,
                        "stats": OBJ,
                    },
                },
                "PublishRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "vm": {**NAME_SCHEMA, "description": "VM name, or NAME@POINT"},
                        "vms": {
                            "type": "array",
                            "items": NAME_SCHEMA,
                            "maxItems": MAX_ITEMS,
                            "description": "mass recovery",
                        },
                        "point": {**NAME_SCHEMA, "default": "latest"},
                        "mode": {"type": "string", "enum": ["instant", "sandbox"], "default": "instant"},
                        "repository": NAME_SCHEMA,
                        "cache": ABS_PATH,
                    },
                },
                "Session": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "vm": {"type": "string"},
                        "point": {"type": "string"},
                        "mode": {"type": "string"},
                        "folder": {"type": "string"},
                        "nfs_url": {"type": "string"},
                        "files": {"type": "array", "items": {"type": "string"}},
                        "cache_used_bytes": {"type": "integer"},
                        "changed_bytes": {"type": "integer"},
                        "migration": {"oneOf": [_ref("Migration"), {"type": "null"}]},
                        "prefetch": {
                            "oneOf": [
                                {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "disk": {"type": "string"},
                                            "chunks": {"type": "integer"},
                                            "done": {"type": "integer"},
                                            "failed": {"type": "integer"},
                                            "running": {"type": "boolean"},
                                        },
                                    },
                                },
                                {"type": "null"},
                            ]
                        },
                    },
                },
                "VerifyRequest": {
                    "type": "object",
                    "required": ["vm"],
                    "additionalProperties": False,
                    "properties": {
                        "vm": {**NAME_SCHEMA, "description": "VM name, or NAME@POINT"},
                        "point": {**NAME_SCHEMA, "default": "latest"},
                        "repository": NAME_SCHEMA,
                        "expect": {
                            "type": "string",
                            "maxLength": 500,
                            "description": "a regular expression a healthy boot prints on the serial console",
                        },
                        "timeout": {"type": "number", "minimum": 10, "maximum": 3600, "default": 300},
                        "memory_mib": {"type": "integer", "minimum": 128, "maximum": 65536, "default": 1024},
                    },
                },
                "Verification": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "vm": {"type": "string"},
                        "point": {"type": "string"},
                        "state": {"type": "string", "enum": ["running", "verified", "failed", "error"]},
                        "started": {"type": "string"},
                        "finished": {"type": ["string", "null"]},
                        "report": {"type": ["object", "null"]},
                        "error": {"type": ["string", "null"]},
                    },
                },
                "Migration": {
                    "type": "object",
                    "properties": {
                        "output": {"type": "string"},
                        "total_bytes": {"type": "integer"},
                        "copied_bytes": {"type": "integer"},
                        "percent": {"type": "number"},
                        "running": {"type": "boolean"},
                        "error": {"type": ["string", "null"]},
                    },
                },
            },
        },
    }
