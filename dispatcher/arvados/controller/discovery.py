"""The discovery document (``GET /discovery/v1/apis/arvados/v1/rest``).

The document served is the real Arvados one (``reference/arvados-v1-discovery.json``) trimmed to
the methods this controller implements, shipped as package data (``discovery.json``) so that
nothing outside the package is read at run time. :data:`SERVED` is the single list of served
methods: the HTTP routes are built from the shipped document, so paths and HTTP methods cannot
drift from what the discovery document promises.

Regenerate the package data after changing :data:`SERVED`::

    python -m dispatcher.arvados.controller.discovery ../shared/reference/arvados-v1-discovery.json
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

# resource -> method names served by the embedded controller.
SERVED: dict[str, tuple[str, ...]] = {
    "containers": ("get", "list", "create", "update", "delete", "auth", "lock", "unlock",
                   "secret_mounts"),
    "container_requests": ("get", "list", "create", "update", "delete"),
    "users": ("get", "list", "current", "system"),
    "api_client_authorizations": ("current",),
    "logs": ("get", "list", "create"),
    "links": ("get", "list", "create", "delete"),
    "configs": ("get",),
}
SCHEMAS = (
    "Container", "ContainerList", "ContainerRequest", "ContainerRequestList", "User", "UserList",
    "ApiClientAuthorization", "ApiClientAuthorizationList", "Log", "LogList", "Link", "LinkList",
)
PACKAGE_FILE = "discovery.json"


def trim_reference(ref: dict[str, Any]) -> dict[str, Any]:
    """The reference discovery document reduced to :data:`SERVED` and :data:`SCHEMAS`."""
    out = {k: copy.deepcopy(v) for k, v in ref.items() if k not in ("resources", "schemas")}
    out["resources"] = {}
    for res, methods in SERVED.items():
        src = ref["resources"][res]["methods"]
        missing = [m for m in methods if m not in src]
        if missing:
            raise KeyError(f"reference discovery document has no {res}.{missing}")
        out["resources"][res] = {"methods": {m: copy.deepcopy(src[m]) for m in methods}}
    out["schemas"] = {s: copy.deepcopy(ref["schemas"][s]) for s in SCHEMAS}
    return out


@functools.cache
def _packaged() -> dict[str, Any]:
    text = resources.files(__package__).joinpath(PACKAGE_FILE).read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


def served_methods() -> list[tuple[str, str, str, str]]:
    """(resource, method, httpMethod, path relative to ``arvados/v1/``) for each served method."""
    out = []
    for res, body in _packaged()["resources"].items():
        for name, m in body["methods"].items():
            out.append((res, name, m["httpMethod"], m["path"]))
    return out


def discovery_document(host: str, *, cluster_id: str, max_request_size: int) -> dict[str, Any]:
    """The document for clients that reached us as ``host`` (``127.0.0.1:8000``)."""
    doc = copy.deepcopy(_packaged())
    root = f"https://{host}/"
    doc["rootUrl"] = root
    doc["servicePath"] = "arvados/v1/"
    doc["basePath"] = "/arvados/v1/"
    doc["baseUrl"] = root + "arvados/v1/"
    doc["batchPath"] = "batch"
    doc["uuidPrefix"] = cluster_id
    doc["maxRequestSize"] = max_request_size
    doc["defaultCollectionReplication"] = 2
    doc["dockerImageFormats"] = ["v2"]
    return doc


def main(argv: list[str] | None = None) -> int:
    """Write the trimmed document next to this module (developer tool)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dispatcher.arvados.controller.discovery REFERENCE.json",
              file=sys.stderr)
        return 2
    ref = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    out = Path(__file__).with_name(PACKAGE_FILE)
    out.write_text(json.dumps(trim_reference(ref), indent=1, sort_keys=True) + "\n",
                   encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
