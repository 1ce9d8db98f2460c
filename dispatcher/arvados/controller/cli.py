"""``crunchgate controller``: run the embedded controller, or add a user.

    crunchgate controller --config FILE [--data DIR] [--cluster ID]
    crunchgate controller add-user NAME [--admin] --config FILE [--data DIR] [--cluster ID]

The controller listens on its entry of ``Services.Controller.InternalURLs`` (``https://`` →
TLS with ``TLS.Certificate``/``TLS.Key``, or a development CA generated in the data directory;
``http://`` → plain HTTP, e.g. behind nginx). ``add-user`` prints the new user's API token on
stdout and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dispatcher import fastloop
from dispatcher.logs import register_secret, setup_logging

from .errors import ControllerError, Unprocessable
from .store import Policy, Store
from .tls import ensure_dev_certs, strip_file_url

log = logging.getLogger("crunchgate.controller")

DB_FILE = "controller.sqlite3"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``crunchgate controller``."""
    parser.add_argument("action", nargs="?", choices=["serve", "add-user"], default="serve",
                        help="serve (default) or add-user NAME")
    parser.add_argument("name", nargs="?", help="user name for add-user")
    parser.add_argument("--config", default=os.environ.get("ARVADOS_CONFIG", "/etc/arvados/config.yml"),
                        help="Arvados config.yml (default: %(default)s)")
    parser.add_argument("--cluster", default=None, help="cluster ID when the file has several")
    parser.add_argument("--data", default=None,
                        help="data directory (default: Crunchgate.DataDirectory, "
                             "$CRUNCHGATE_DATA, /var/lib/crunchgate/<ID> or "
                             "~/.local/share/crunchgate/<ID>)")
    parser.add_argument("--admin", action="store_true", help="add-user: make the user an admin")
    parser.add_argument("--no-broker", action="store_true",
                        help="do not host the tunnel broker (container shells, gateway tunnels)")


def data_directory(cfg: Any, override: str | None = None) -> Path:
    """Where the database and generated TLS files live (see :func:`configure_parser`)."""
    if override:
        return Path(override)
    if cfg.crunchgate.data_directory:
        return Path(cfg.crunchgate.data_directory)
    env = os.environ.get("CRUNCHGATE_DATA")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/crunchgate") / cfg.cluster_id
    return Path.home() / ".local" / "share" / "crunchgate" / cfg.cluster_id


def open_store(cfg: Any, data_dir: Path) -> Store:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Store(data_dir / DB_FILE, Policy.from_config(cfg))


def certificate_names(cfg: Any, listen_host: str) -> list[str]:
    """Names a generated development certificate must carry: the listen host, the controller's
    ExternalURL host, and the container web services host (``*.containers.example`` for the
    wildcard form, the plain host for the port-range form), so that browsers and curl trusting
    the dev CA reach container web services too."""
    from dispatcher.config import controller_url

    names = [listen_host]
    with contextlib.suppress(Exception):
        ext = urlsplit(controller_url(cfg)).hostname
        if ext:
            names.append(ext)
    with contextlib.suppress(Exception):
        ws = urlsplit(cfg.services.container_web_services.external_url).hostname
        if ws:
            names.append(ws)
    return list(dict.fromkeys(names))


def tls_context(cfg: Any, data_dir: Path, hostnames: list[str]) -> tuple[ssl.SSLContext, str | None]:
    """Server TLS context: the configured certificate, else the generated development one.

    Also returns the dev CA file when one was generated (None with a configured certificate),
    for in-process clients of this controller (the tunnel broker)."""
    ca_file = None
    if cfg.tls.certificate and cfg.tls.key:
        cert, key = strip_file_url(cfg.tls.certificate), strip_file_url(cfg.tls.key)
    else:
        paths = ensure_dev_certs(data_dir, hostnames)
        cert, key, ca_file = str(paths.cert), str(paths.key), str(paths.ca_cert)
        log.info("using development TLS certificate", extra={"fields": {
            "certificate": cert, "ca_certificate": str(paths.ca_cert)}})
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx, ca_file


def broker_setup(cfg: Any, ca_file: str | None) -> Any:
    """The tunnel broker as an ``extra_setup`` callable (the embedded controller hosts it), or
    None when the ``tunnel`` package is not available."""
    try:
        from tunnel.broker import controller_setup
    except ImportError as exc:
        log.warning("tunnel broker not available, container shells are disabled: %s", exc)
        return None
    from dispatcher.config import service_internal_url

    return controller_setup(cfg, ca_file=ca_file,
                            internal_url=service_internal_url(cfg, "Controller"))


async def serve(
    cfg: Any,
    data_dir: Path,
    *,
    extra_setup: tuple[Any, ...] = (),
    config_path: str | None = None,
    with_broker: bool = True,
) -> None:
    """Run the controller until SIGTERM/SIGINT."""
    from dispatcher.config import listen_url
    from dispatcher.service import run_service

    from .app import build_app

    url = listen_url(cfg, "Controller")
    parts = urlsplit(url)
    host = (parts.hostname or "127.0.0.1").strip("[]")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    names = certificate_names(cfg, host)
    ctx, ca_file = tls_context(cfg, data_dir, names) if parts.scheme == "https" else (None, None)
    if with_broker:
        broker = broker_setup(cfg, ca_file)
        if broker is not None:
            extra_setup = (*extra_setup, broker)
    if ctx is None:
        log.warning("serving plain HTTP: the Arvados SDK needs HTTPS (put a TLS proxy in front)")

    store = open_store(cfg, data_dir)
    try:
        app = build_app(cfg, store, extra_setup, config_path=config_path)
        log.info("controller starting", extra={"fields": {
            "url": url, "listen": f"{host}:{port}", "data_directory": str(data_dir)}})
        await run_service(app, host, port, ssl_context=ctx)
    finally:
        store.close()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crunchgate controller``."""
    from dispatcher.config import ConfigError, load_config
    from dispatcher.service import ServiceError

    try:
        cfg = load_config(args.config, args.cluster)
    except (ConfigError, OSError) as exc:
        print(f"crunchgate controller: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.system_logs.log_level, cfg.system_logs.format, cfg.cluster_id)
    register_secret(cfg.system_root_token)
    register_secret(cfg.management_token)
    data_dir = data_directory(cfg, args.data)

    if args.action == "add-user":
        if not args.name:
            print("crunchgate controller add-user: give a user NAME", file=sys.stderr)
            return 2
        try:
            store = open_store(cfg, data_dir)
            try:
                _, token = store.create_user(args.name, is_admin=args.admin)
            finally:
                store.close()
        except (ControllerError, OSError) as exc:
            msg = exc.message if isinstance(exc, Unprocessable) else str(exc)
            print(f"crunchgate controller add-user: {msg}", file=sys.stderr)
            return 1
        print(token)
        return 0

    if args.name:
        print(f"crunchgate controller: unexpected argument {args.name!r}", file=sys.stderr)
        return 2
    if not cfg.system_root_token:
        print(
            f"crunchgate controller: Clusters.{cfg.cluster_id}.SystemRootToken is empty; set it "
            "(dispatchers and crunch-run authenticate with it)",
            file=sys.stderr,
        )
        return 2
    try:
        fastloop.run(serve(cfg, data_dir, config_path=args.config,
                          with_broker=not args.no_broker))
    except (ConfigError, ControllerError, ServiceError, OSError, ssl.SSLError) as exc:
        log.error("controller failed: %s", exc)
        print(f"crunchgate controller: {exc}", file=sys.stderr)
        return 1
    return 0
