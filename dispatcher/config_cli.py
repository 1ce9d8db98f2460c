"""``crunchgate config``: check a config file, or print the defaults.

    crunchgate config check /etc/arvados/config.yml [--cluster zzzzz]
    crunchgate config defaults

``check`` prints ``ok: <cluster id>`` and exits 0, or prints every error (one ``error:`` line
each, naming the file, the key path and the bad value) and exits 1. Deprecated keys that still load are reported as ``warning:`` lines on
stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dispatcher.config import ConfigError, defaults_yaml, load_config

DEFAULT_CONFIG = "/etc/arvados/config.yml"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``check`` and ``defaults`` sub-subcommands."""
    sub = parser.add_subparsers(dest="config_command", metavar="{check,defaults}")
    sub.required = True
    check = sub.add_parser(
        "check", help="validate a config file", description="Validate a config file."
    )
    check.add_argument(
        "file", nargs="?", default=DEFAULT_CONFIG,
        help=f"config file to check (default {DEFAULT_CONFIG})",
    )
    check.add_argument(
        "--cluster", metavar="ID", default=None,
        help="cluster ID to check when the file configures several",
    )
    sub.add_parser(
        "defaults", help="print the default configuration as YAML",
        description="Print the complete default configuration (Arvados key names) as YAML.",
    )


def run(args: argparse.Namespace) -> int:
    """Run the chosen sub-subcommand; return the exit status."""
    if args.config_command == "defaults":
        sys.stdout.write(defaults_yaml())
        return 0
    # The loader also logs its warnings; here they are printed once, below, instead.
    config_log = logging.getLogger("crunchgate.config")
    saved = config_log.disabled
    config_log.disabled = True
    try:
        cfg = load_config(args.file, args.cluster)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    finally:
        config_log.disabled = saved
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {cfg.cluster_id}")
    return 0
