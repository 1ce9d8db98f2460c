"""A second ``crunchgate dispatch-cloud`` for the same cluster on the same host refuses to start
and names the running one's PID (crunchgate's stand-in for the reference's PostgreSQL advisory
lock 10005, reference appendix A item 9)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest
import yaml

from dispatcher.cloud.cli import EXIT_ALREADY_RUNNING
from dispatcher.hostlock import ENV_LOCK_DIR, HostLock, lock_path
from tests.helpers.cloud import stop_pid


def write_config(tmp: Path) -> Path:
    key = tmp / "dispatch.pem"
    key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    doc = {"Clusters": {"zzzzz": {
        "SystemRootToken": "systemroottoken0123456789",
        "ManagementToken": "managementtoken0123456789",
        # Nothing listens there: the dispatcher keeps retrying its first queue poll.
        "Services": {"Controller": {"ExternalURL": "https://127.0.0.1:1"}},
        "SystemLogs": {"Format": "json"},
        "Containers": {
            "DispatchPrivateKey": f"file://{key}",
            "CloudVMs": {"Driver": "loopback", "PollInterval": "1s",
                         "DriverParameters": {"StateFile": str(tmp / "loopback.json")}},
        },
    }}}
    cfg = tmp / "config.yml"
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def dispatch_cloud(cfg: Path, env: dict[str, str], **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "dispatch-cloud",
                             "--config", str(cfg)], env=env, stdin=subprocess.DEVNULL,
                            text=True, **kw)


def test_second_dispatcher_on_this_host_refuses_naming_the_first(tmp_path):
    cfg = write_config(tmp_path)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ARVADOS_")},
           ENV_LOCK_DIR: str(tmp_path)}
    path = Path(lock_path("zzzzz", "dispatch-cloud", str(tmp_path)))
    first = dispatch_cloud(cfg, env, stdout=subprocess.DEVNULL,
                           stderr=open(tmp_path / "first.log", "w"))
    try:
        deadline = time.monotonic() + 60
        while not (path.exists() and path.read_text().strip() == str(first.pid)):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            if time.monotonic() > deadline:
                pytest.fail("the first dispatcher never took its lock")
            time.sleep(0.1)
        second = dispatch_cloud(cfg, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = second.communicate(timeout=60)
        assert second.returncode == EXIT_ALREADY_RUNNING, err
        assert f"already running on this host (PID {first.pid};" in err
        assert str(path) in err
        assert first.poll() is None, "the first dispatcher must be left alone"
    finally:
        stop_pid(first)
    # However it stopped, the lock went with it.
    with HostLock("zzzzz", "dispatch-cloud", directory=str(tmp_path)) as lock:
        assert lock.held
