"""The embedded Arvados-compatible controller: aiohttp + SQLite.

``build_app(cfg, store, extra_setup=())`` builds the aiohttp application; ``Store(path,
Policy.from_config(cfg))`` holds the state. ``crunchgate controller`` (:mod:`.cli`) runs both.
"""

from .app import add_container_listener, authenticate_request, build_app
from .store import Policy, Store
from .tls import CertPaths, ensure_dev_certs

__all__ = [
    "build_app",
    "add_container_listener",
    "authenticate_request",
    "Store",
    "Policy",
    "CertPaths",
    "ensure_dev_certs",
]
