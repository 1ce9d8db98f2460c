"""``crunchgate certs``: a development CA and server certificate for the embedded setup.

A thin command around the embedded controller's generator
(:func:`dispatcher.arvados.controller.tls.ensure_dev_certs`), so ``crunchgate certs`` and
``crunchgate controller`` produce and reuse the same files: ``<dir>/tls/ca.crt``, ``ca.key``,
``server.crt``, ``server.key``. The CA is kept across runs; the server certificate is re-issued
when a requested name is missing. Add a wildcard such as ``*.containers.localhost`` for
container web services. Clients then trust ``ca.crt`` (``ARVADOS_API_CA_FILE``,
``crunchgate shell --ca-file``) instead of turning verification off.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dispatcher.arvados.controller.tls import CertPaths, ensure_dev_certs


def make_certs(directory: str | Path, hosts: list[str] | tuple[str, ...] = ()) -> CertPaths:
    """Create or reuse the CA and a server certificate for ``hosts`` under ``directory/tls``."""
    return ensure_dev_certs(directory, list(hosts))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=".", help="data directory; files go to DIR/tls "
                        "(use the controller's --data directory to share them)")
    parser.add_argument("--host", action="append", default=[],
                        help="extra server name, IP or wildcard (repeatable); localhost, "
                             "127.0.0.1, ::1 and this host's name are always included")


def run(args: argparse.Namespace) -> int:
    paths = make_certs(args.dir, args.host)
    print(f"CA certificate:     {paths.ca_cert}")
    print(f"server certificate: {paths.cert}")
    print(f"server key:         {paths.key}")
    print("Set TLS.Certificate / TLS.Key to the server files (or run the controller with "
          "--data on the same directory) and give clients the CA: "
          "ARVADOS_API_CA_FILE=<ca.crt> or --ca-file.")
    return 0
