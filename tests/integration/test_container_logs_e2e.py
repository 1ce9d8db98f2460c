"""Container logs end to end with real processes: two embedded controllers (C1, C2) on one
database, a real ``crunch-run`` (local runtime) whose tunnel lands on C2, requests to C1.

While the container runs, C1 forwards ``/arvados/v1/container_requests/<cr>/log/<ctr>/...`` to
C2, which asks crunch-run's gateway over the tunnel (its local copy of the logs); once the
container has ended, C1 answers from the ``logs`` table itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration import test_tunnel_controllers as c1c2
from tests.integration.test_tunnel_controllers import ROOT, Cluster

pytestmark = pytest.mark.slow
cluster = c1c2.cluster  # the two-controller fixture


def dav(cl: Cluster, method: str, path: str, token: str, headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(cl.urls[0].rstrip("/") + path, method=method, data=body,
                                 headers={"Authorization": f"Bearer {token}", **(headers or {})})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def hello_request(cluster: Cluster, token: str, tmp_path: Path, more: str = "") -> tuple[str, str]:
    """A committed container request whose container writes "hello world" to stderr (and
    then runs the shell code ``more``) and ends when the test creates ``tmp_path/stop`` (its
    own poll, not ours); (container UUID, request UUID)."""
    cr = cluster.api("POST", "container_requests", token, {"container_request": {
        "command": ["sh", "-c", f"echo hello world >&2; {more}"
                    f"while [ ! -e {tmp_path}/stop ]; do sleep 0.1; done"],
        "container_image": "debian:12", "output_path": "/out", "cwd": "/tmp",
        "runtime_constraints": {"vcpus": 1, "ram": 64 << 20}, "state": "Committed",
        "priority": 1}})
    return cr["container_uuid"], cr["uuid"]


def end_hello(crun: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """Clean-up for :func:`hello_request`: its workload ends by itself (it runs in a session of
    its own, which killing crunch-run would not reach), then crunch-run if it still runs."""
    (tmp_path / "stop").touch()
    if crun.poll() is None:
        os.killpg(crun.pid, signal.SIGKILL)
        crun.wait(10)


def test_live_logs_via_c1_then_saved_logs(cluster: Cluster, tmp_path: Path) -> None:
    user_token = cluster.add_user("alice")
    uuid, cr_uuid = hello_request(cluster, user_token, tmp_path, "echo out; ")
    base = f"/arvados/v1/container_requests/{cr_uuid}/log"
    # Before it runs: an empty directory, no error.
    status, _, body = dav(cluster, "PROPFIND", base + "/", user_token, {"Depth": "1"})
    assert status == 207 and body.count(b"<D:response>") == 1
    cluster.api("POST", f"containers/{uuid}/lock")

    secret = hmac.new(ROOT.encode(), uuid.encode(), hashlib.sha256).hexdigest()
    crun_log = tmp_path / "crunch-run.log"
    crun = cluster.start_crunch_run(uuid, tmp_path)
    try:
        live = f"{base}/{uuid}/stderr.txt"
        deadline = time.monotonic() + 20
        while True:
            status, headers, body = dav(cluster, "GET", live, user_token)
            if status == 200 and body == b"hello world\n":
                break
            assert time.monotonic() < deadline, (status, body[:300])
            time.sleep(0.1)
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        status, headers, body = dav(cluster, "GET", live, user_token, {"Range": "bytes=-6"})
        assert (status, body, headers["Content-Range"]) == (206, b"world\n", "bytes 6-11/12")
        # With a body, as WebDAV clients send it (forwarded C1 -> C2 with it).
        status, _, body = dav(cluster, "PROPFIND", f"{base}/{uuid}/", user_token,
                              {"Depth": "1", "Content-Type": "application/xml"},
                              b'<?xml version="1.0"?><propfind xmlns="DAV:"><allprop/>'
                              b"</propfind>")
        assert status == 207
        for name in (b"stderr.txt", b"stdout.txt", b"crunch-run.txt"):
            assert name in body
        status, headers, _ = dav(cluster, "OPTIONS", f"{base}/{uuid}/", user_token)
        assert status == 200 and headers["Dav"] == "1, 2"
        status, _, _ = dav(cluster, "GET", live, "v2/zzzzz-gj3su-000000000000000/nope")
        assert status == 401

        # The container ends: the saved logs take over.
        (tmp_path / "stop").touch()
        crun.wait(30)
        assert cluster.api("GET", f"containers/{uuid}")["state"] == "Complete"
        status, _, body = dav(cluster, "GET", live, user_token)
        assert (status, body) == (200, b"hello world\n")
        status, _, body = dav(cluster, "GET", f"{base}/stdout.txt", user_token)
        assert (status, body) == (200, b"out\n")
        status, _, body = dav(cluster, "PROPFIND", base, user_token, {"Depth": "1"})
        assert status == 207 and b"crunch-run.txt" in body and f"{uuid}/".encode() in body
    finally:
        end_hello(crun, tmp_path)
    logs = [cluster.log(0), cluster.log(1), crun_log.read_text(errors="replace")]
    for text in logs:
        assert ROOT not in text and user_token.rsplit("/", 1)[-1] not in text
        assert secret not in text
