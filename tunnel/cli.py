"""``crunchgate broker --config FILE``: the tunnel broker as its own service.

Runs beside a real Arvados controller (or any API server speaking the Arvados API): the
reverse proxy sends ``/arvados/v1/connect/`` (and, for container web services, the
``Services.ContainerWebServices`` host names) to it. It uses the API with SystemRootToken to
read containers and write ``gateway_address``.

Which URL it serves: ``--internal-url`` (default: this host's entry of
``Services.Controller.InternalURLs``, or ``$ARVADOS_SERVICE_INTERNAL_URL``). That URL is what
goes into ``gateway_address``, so every broker's URL must be listed in
``Services.Controller.InternalURLs`` for C1 -> C2 forwarding to accept it. TLS:
``TLS.Certificate``/``TLS.Key``, else a development certificate under ``--data``/tls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="/etc/arvados/config.yml", help="cluster config")
    parser.add_argument("--cluster", default=None, help="cluster ID (default: the only one)")
    parser.add_argument("--internal-url", default=None,
                        help="the URL this broker is reached at (default from the config)")
    parser.add_argument("--listen", default=None,
                        help="host:port to listen on (default: from the internal URL)")
    parser.add_argument("--data", default=None,
                        help="directory for generated TLS material (default ./broker-data)")


def run(args: argparse.Namespace) -> int:
    from dispatcher import fastloop
    from dispatcher.config import ConfigError, load_config, service_internal_url
    from dispatcher.logs import register_secret, setup_logging

    try:
        cfg = load_config(args.config, args.cluster)
        internal = args.internal_url or service_internal_url(cfg, "Controller")
    except (ConfigError, OSError) as exc:
        print(f"crunchgate broker: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.system_logs.log_level, cfg.system_logs.format, cfg.cluster_id)
    register_secret(cfg.system_root_token)
    register_secret(cfg.management_token)
    if not cfg.system_root_token:
        print("crunchgate broker: SystemRootToken is empty; tunnels cannot be authenticated",
              file=sys.stderr)
        return 2
    try:
        fastloop.run(_serve(cfg, internal, args.listen, Path(args.data or "broker-data")))
    except Exception as exc:  # noqa: BLE001 - top level: one clear line
        print(f"crunchgate broker: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(cfg: object, internal_url: str, listen: str | None, data_dir: Path) -> None:
    from dispatcher.arvados.controller.tls import ensure_dev_certs
    from dispatcher.service import create_service_app, run_service
    from tunnel.broker import controller_setup

    parts = urlsplit(listen if listen and "://" in listen else f"//{listen}" if listen
                     else internal_url)
    host = (parts.hostname or "127.0.0.1").strip("[]")
    port = parts.port or 443
    ssl_ctx = None
    ca_file = None
    if urlsplit(internal_url).scheme == "https":
        import ssl

        tls = cfg.tls  # type: ignore[attr-defined]
        if tls.certificate and tls.key:
            cert, key = tls.certificate, tls.key
        else:
            paths = ensure_dev_certs(data_dir, [host])
            cert, key, ca_file = str(paths.cert), str(paths.key), str(paths.ca_cert)
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cert.removeprefix("file://"), key.removeprefix("file://"))
    app = create_service_app(cfg, "Controller")  # type: ignore[arg-type]
    controller_setup(cfg, ca_file=ca_file, internal_url=internal_url)(app)
    await run_service(app, host, port, ssl_context=ssl_ctx)
