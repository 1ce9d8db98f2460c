"""The ``crunchgate`` command line.

Each subcommand lives in its own module, which exports two functions::

    def configure_parser(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

Only the module of the chosen subcommand is imported, so ``crunchgate shell`` does not pay for
importing the cloud drivers, and a broken optional dependency only breaks its own subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dispatcher.demo", "run controller + dispatcher + a sample workload end to end"),
    "controller": ("dispatcher.arvados.controller.cli", "run the embedded Arvados-compatible controller"),
    "dispatch-local": ("dispatcher.local.cli", "dispatch containers as local processes"),
    "dispatch-slurm": ("dispatcher.slurm.cli", "dispatch containers to Slurm (drop-in crunch-dispatch-slurm)"),
    "dispatch-lsf": ("dispatcher.lsf.cli", "dispatch containers to LSF (drop-in arvados-dispatch-lsf)"),
    "dispatch-cloud": ("dispatcher.cloud.cli", "dispatch containers to cloud VMs (drop-in arvados-dispatch-cloud)"),
    "broker": ("tunnel.cli", "run the reverse-tunnel broker beside a real Arvados controller"),
    "crunch-run": ("dispatcher.crunchrun.main", "the compute-node supervisor (same as the crunch-run command)"),
    "shell": ("tunnel.client.shell", "open a shell in a running container"),
    "connect-ssh": ("tunnel.client.connect_ssh", "stdin/stdout bridge for OpenSSH's ProxyCommand"),
    "certs": ("tunnel.certs", "create a development CA and server certificates"),
    "config": ("dispatcher.config_cli", "check a config file or print the defaults"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crunchgate",
        description="HPC batch-submission gateway for Arvados containers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\nRun 'crunchgate COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"crunchgate {_version()}")
    parser.add_argument("command", nargs="?", help=argparse.SUPPRESS)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("crunchgate")
    except Exception:  # not installed (running from a checkout)
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        parser = _top_parser()
        parser.parse_args(argv)
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"crunchgate: unknown command {name!r}; run 'crunchgate --help' for the list",
            file=sys.stderr,
        )
        return 2
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"crunchgate {name}: not available in this installation ({exc})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"crunchgate {name}", description=help_)
    module.configure_parser(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
