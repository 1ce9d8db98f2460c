"""``crunchgate controller`` option handling (no server started)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dispatcher.arvados.controller import cli
from dispatcher.config import parse_config


def _cfg(**crunchgate: str):  # type: ignore[no-untyped-def]
    cluster = {"SystemRootToken": "x" * 20}
    if crunchgate:
        cluster["Crunchgate"] = crunchgate  # type: ignore[assignment]
    return parse_config({"Clusters": {"abcde": cluster}})


def test_data_directory_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRUNCHGATE_DATA", str(tmp_path / "env"))
    assert cli.data_directory(_cfg(), str(tmp_path / "flag")) == tmp_path / "flag"
    assert cli.data_directory(_cfg(DataDirectory=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert cli.data_directory(_cfg()) == tmp_path / "env"
    monkeypatch.delenv("CRUNCHGATE_DATA")
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    assert cli.data_directory(_cfg()) == Path("/var/lib/crunchgate/abcde")
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.data_directory(_cfg()) == tmp_path / "home/.local/share/crunchgate/abcde"


def test_parser_forms() -> None:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args(["--config", "c.yml", "--data", "d"])
    assert (args.action, args.name, args.config, args.data) == ("serve", None, "c.yml", "d")
    args = parser.parse_args(["add-user", "alice", "--admin", "--config", "c.yml"])
    assert (args.action, args.name, args.admin) == ("add-user", "alice", True)


def test_add_user_prints_only_the_token(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep pytest's own logging set-up: run() would install the JSON handler on the root logger.
    monkeypatch.setattr(cli, "setup_logging", lambda *a, **k: None)
    config = tmp_path / "config.yml"
    config.write_text("Clusters:\n  abcde:\n    SystemRootToken: xxxxxxxxxxxxxxxxxxxxxxx\n")
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args(["add-user", "bob", "--config", str(config), "--data",
                              str(tmp_path / "data")])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("v2/abcde-gj3su-") and out.count("\n") == 1
    assert cli.run(args) == 1  # the name is taken
    assert (tmp_path / "data" / cli.DB_FILE).exists()


@pytest.mark.parametrize("flags, brokers", [([], 1), (["--no-broker"], 0)])
def test_broker_is_mounted_once_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              flags: list[str], brokers: int) -> None:
    """The tunnel broker's routes exist exactly once (a second mount would shadow the first
    and split its state), and ``--no-broker`` really leaves them out."""
    from aiohttp import web

    import dispatcher.service

    monkeypatch.setattr(cli, "setup_logging", lambda *a, **k: None)
    served: list[web.Application] = []

    async def fake_run_service(app: web.Application, *args: object, **kwargs: object) -> None:
        served.append(app)

    monkeypatch.setattr(dispatcher.service, "run_service", fake_run_service)
    config = tmp_path / "config.yml"
    config.write_text(
        "Clusters:\n  abcde:\n    SystemRootToken: xxxxxxxxxxxxxxxxxxxxxxx\n"
        "    Services:\n      Controller:\n"
        "        ExternalURL: https://127.0.0.1:9\n"
        "        InternalURLs: {'https://127.0.0.1:9': {}}\n")
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args(["--config", str(config), "--data", str(tmp_path / "data"), *flags])
    assert cli.run(args) == 0
    (app,) = served
    tunnel_routes = [r for r in app.router.routes()
                     if r.resource is not None and r.method == "POST"
                     and r.resource.canonical == "/arvados/v1/connect/{uuid}/gateway_tunnel"]
    assert len(tunnel_routes) == brokers
