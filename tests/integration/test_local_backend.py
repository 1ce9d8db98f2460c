"""LocalBackend against real processes: detached jobs, records that survive a restart, pid-reuse
detection, SIGTERM cancel, the job-slot queue, and no secrets in job output."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from dispatcher.config import ClusterConfig
from dispatcher.core.backend import Job
from dispatcher.local.backend import MARKER_ENV, LocalBackend, _proc_stat
from tests.helpers.core import core_run

ROOT_TOKEN = "local-backend-test-root-token-0123456789"
# A stand-in for crunch-run: records its UUID argument, prints a log line (unless $CG_SILENT),
# stops on SIGTERM, or exits at once when $CG_QUICK is set. $2 is the UUID ($1 is
# --runtime-engine=...).
FAKE_CRUNCH_RUN = (
    'echo "start $2 $1" >> "$CG_OUT"; '
    '[ -z "$CG_SILENT" ] && echo "crunch-run log line of $2"; '
    '[ -n "$CG_QUICK" ] && exit 0; '
    'trap \'echo "term $2" >> "$CG_OUT"; exit 143\' TERM; '
    "while :; do sleep 0.05; done"
)


def uuid(n: int) -> str:
    return f"zzzzz-dz642-{n:015d}"


def wait_for(cond, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def local_env(tmp_path):
    cfg = ClusterConfig(cluster_id="zzzzz", system_root_token=ROOT_TOKEN)
    cfg.containers.crunch_run_command = "/bin/sh"
    cfg.containers.crunch_run_arguments_list = ["-c", FAKE_CRUNCH_RUN, "fake-crunch-run"]
    cfg.containers.runtime_engine = "local"
    out = tmp_path / "out.txt"
    out.touch()
    env = {"PATH": os.environ["PATH"], "CG_OUT": str(out), "ARVADOS_API_TOKEN": ROOT_TOKEN}
    started: list[LocalBackend] = []

    def make(**kw) -> LocalBackend:
        be = LocalBackend(cfg, tmp_path / "state", job_env={**env, **kw.pop("env", {})}, **kw)
        core_run(be.start())
        started.append(be)
        return be

    yield cfg, make, out, tmp_path / "state" / "local-jobs"
    # Stop every job process the test left behind, by the pids in our own records.
    for path in (tmp_path / "state" / "local-jobs").glob("*.job"):
        rec = json.loads(path.read_text())
        if rec.get("pid") and _proc_stat(rec["pid"]) and rec.get("start_ticks") == _proc_stat(
                rec["pid"])[1]:
            os.kill(rec["pid"], signal.SIGKILL)


def listed(be: LocalBackend) -> dict[str, Job]:
    return core_run(be.list_jobs())


def test_submit_runs_detached_job_and_cancel_sends_sigterm(local_env):
    cfg, make, out, jobdir = local_env
    be = make()
    u = uuid(1)
    core_run(be.submit({"uuid": u}))
    jobs = listed(be)
    assert jobs[u].state == "RUNNING" and not jobs[u].pending
    pid = int(jobs[u].job_id)
    assert os.getsid(pid) == pid  # its own session: survives the dispatcher
    wait_for(lambda: f"start {u} --runtime-engine=local" in out.read_text())
    script = jobdir / f"{u}.sh"
    assert stat.S_IMODE(script.stat().st_mode) == 0o600
    assert stat.S_IMODE(jobdir.stat().st_mode) == 0o700
    assert script.read_text().startswith("#!/bin/sh\nGatewayAuthSecret='")
    assert ROOT_TOKEN not in script.read_text()  # credentials go in the environment only
    # submitting again is a no-op (job name = container UUID)
    core_run(be.submit({"uuid": u}))
    assert list(listed(be)) == [u]
    core_run(be.cancel(u, jobs[u]))
    wait_for(lambda: f"term {u}" in out.read_text())
    wait_for(lambda: u not in listed(be))
    assert not script.exists() and not (jobdir / f"{u}.job").exists()
    log_text = (jobdir / f"{u}.log").read_text()
    assert f"crunch-run log line of {u}" in log_text
    assert ROOT_TOKEN not in log_text and "GatewayAuthSecret" not in log_text


def test_logs_of_ended_jobs_are_bounded(local_env):
    cfg, make, out, jobdir = local_env
    be = make(env={"CG_QUICK": "1"}, keep_logs=2)
    ended: list[str] = []
    for n in range(40, 44):
        u = uuid(n)
        core_run(be.submit({"uuid": u}))
        wait_for(lambda u=u: f"start {u}" in out.read_text() and u not in listed(be))
        ended.append(u)
        # mtime order decides which logs stay; make it unambiguous on coarse clocks
        os.utime(jobdir / f"{u}.log", (1_000_000 + n, 1_000_000 + n))
    # A running job's log is never pruned, however many ended since it started.
    slow = make(env={"CG_QUICK": ""}, keep_logs=2)
    running = uuid(49)
    core_run(slow.submit({"uuid": running}))
    wait_for(lambda: f"start {running}" in out.read_text())
    os.utime(jobdir / f"{running}.log", (1_000_000, 1_000_000))  # the oldest of all
    u = uuid(45)
    core_run(be.submit({"uuid": u}))
    wait_for(lambda: f"start {u}" in out.read_text() and u not in listed(be))
    ended.append(u)
    logs = sorted(p.stem for p in jobdir.glob("*.log"))
    assert logs == sorted([ended[-2], ended[-1], running])
    assert f"crunch-run log line of {ended[-1]}" in (jobdir / f"{ended[-1]}.log").read_text()
    # A job that wrote nothing leaves no empty log behind.
    quiet = make(env={"CG_QUICK": "1", "CG_SILENT": "1"})
    q = uuid(46)
    core_run(quiet.submit({"uuid": q}))
    wait_for(lambda: f"start {q}" in out.read_text() and q not in listed(quiet))
    assert not (jobdir / f"{q}.log").exists()
    core_run(slow.cancel(running, listed(slow)[running]))
    wait_for(lambda: running not in listed(slow))


def test_jobs_survive_a_new_backend_instance(local_env):
    cfg, make, out, jobdir = local_env
    first = make()
    u = uuid(2)
    core_run(first.submit({"uuid": u}))
    pid = listed(first)[u].job_id
    first._children.clear()  # noqa: SLF001 - as after a kill -9: no Popen object any more
    second = make()
    assert listed(second)[u].job_id == pid
    core_run(second.cancel(u, None))
    wait_for(lambda: u not in listed(second))


def test_recycled_pid_is_not_our_job(local_env):
    cfg, make, out, jobdir = local_env
    be = make()
    u = uuid(3)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        ticks = _proc_stat(sleeper.pid)[1]
        (jobdir / f"{u}.job").write_text(json.dumps({"pid": sleeper.pid,
                                                     "start_ticks": ticks - 1}))
        assert u not in listed(be)
        assert not (jobdir / f"{u}.job").exists()
        # and cancel of such a record never signals the unrelated process
        (jobdir / f"{u}.job").write_text(json.dumps({"pid": sleeper.pid,
                                                     "start_ticks": ticks - 1}))
        core_run(be.cancel(u, None))
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_interrupted_launch_is_recovered_from_the_marker(local_env):
    cfg, make, out, jobdir = local_env
    be = make()
    u = uuid(4)
    env = {**os.environ, MARKER_ENV: u}
    proc = subprocess.Popen(["sleep", "30"], env=env, start_new_session=True)
    try:
        # (the exec of "sleep" is complete once its environment shows the marker)
        wait_for(lambda: f"{MARKER_ENV}={u}".encode() in
                 Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0"))
        (jobdir / f"{u}.job").write_text(json.dumps(
            {"pid": 0, "launching": True, "launching_at": time.time() - 60}))
        jobs = listed(be)
        assert jobs[u].job_id == str(proc.pid) and jobs[u].state == "RUNNING"
    finally:
        proc.kill()
        proc.wait()


def test_job_slots_queue_pending_jobs_by_priority(local_env):
    cfg, make, out, jobdir = local_env
    be = make(max_jobs=1)
    a, b, c = uuid(5), uuid(6), uuid(7)
    core_run(be.submit({"uuid": a}))
    core_run(be.submit({"uuid": b}))
    core_run(be.submit({"uuid": c}))
    jobs = listed(be)
    assert jobs[a].state == "RUNNING"
    assert jobs[b].pending and "free local job slot" in jobs[b].reason
    assert be.scheduling_status(jobs[b]) == jobs[b].reason
    core_run(be.set_priorities({b: 1, c: 2}, jobs))
    core_run(be.cancel(a, jobs[a]))
    wait_for(lambda: listed(be).get(c, Job(c)).state == "RUNNING")
    assert listed(be)[b].pending
    core_run(be.cancel(b, None))  # a pending job is just dropped
    assert b not in listed(be)
    core_run(be.cancel(c, None))
    wait_for(lambda: not listed(be))


def test_finished_job_is_forgotten(local_env):
    cfg, make, out, jobdir = local_env
    be = make(env={"CG_QUICK": "1"})
    u = uuid(8)
    core_run(be.submit({"uuid": u}))
    wait_for(lambda: u not in listed(be))
    assert f"start {u}" in out.read_text()


def test_job_environment_carries_the_api_credentials():
    from dispatcher.local.cli import job_environment

    cfg = ClusterConfig(cluster_id="zzzzz", system_root_token=ROOT_TOKEN)
    cfg.services.controller.external_url = "https://ctl.example:8443"
    env = job_environment(cfg, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "ARVADOS_API_HOST": "ctl.example:8443",
                   "ARVADOS_API_TOKEN": ROOT_TOKEN, "ARVADOS_API_HOST_INSECURE": ""}
    cfg.tls.insecure = True
    assert job_environment(cfg, {})["ARVADOS_API_HOST_INSECURE"] == "1"


def test_job_ignoring_sigterm_is_killed_on_a_later_cancel(local_env):
    cfg, make, out, jobdir = local_env
    cfg.containers.crunch_run_arguments_list = [
        "-c", 'trap "" TERM; echo "start $2" >> "$CG_OUT"; while :; do sleep 0.05; done', "x"]
    be = make(kill_after_s=60)
    u = uuid(9)
    core_run(be.submit({"uuid": u}))
    wait_for(lambda: f"start {u}" in out.read_text())
    core_run(be.cancel(u, None))
    record = jobdir / f"{u}.job"
    rec = json.loads(record.read_text())
    assert rec["term_at"] > 0
    core_run(be.cancel(u, None))  # SIGTERM again: still within kill_after_s
    assert u in listed(be)  # SIGTERM was ignored
    # a minute later (backdate the first SIGTERM rather than wait)
    record.write_text(json.dumps({**rec, "term_at": rec["term_at"] - 61}))
    core_run(be.cancel(u, None))
    wait_for(lambda: u not in listed(be))


def test_unsatisfiable_container_is_refused_before_anything_runs(local_env):
    from dispatcher.config import InstanceType
    from dispatcher.core.sizing import ConstraintsNotSatisfiable

    cfg, make, out, jobdir = local_env
    cfg.instance_types = {"small": InstanceType(name="small", vcpus=1, ram=1 << 30,
                                                included_scratch=1 << 30, price=1.0)}
    be = make()
    with pytest.raises(ConstraintsNotSatisfiable):
        core_run(be.submit({"uuid": uuid(10), "runtime_constraints": {"vcpus": 64,
                                                                       "ram": 1 << 30}}))
    assert not list(jobdir.iterdir())


def test_inspecting_backend_never_starts_jobs(local_env):
    cfg, make, out, jobdir = local_env
    runner = make(max_jobs=1)
    a, b = uuid(11), uuid(12)
    core_run(runner.submit({"uuid": a}))
    core_run(runner.submit({"uuid": b}))
    inspector = make(start_jobs=False, max_jobs=10)
    jobs = listed(inspector)
    assert jobs[a].state == "RUNNING" and jobs[b].pending
    for name, job in jobs.items():
        core_run(inspector.cancel(name, job))
    wait_for(lambda: not listed(inspector))
    assert f"start {b}" not in out.read_text()


def test_interrupted_launch_without_a_process_is_pending_again_after_a_second_miss(local_env):
    cfg, make, out, jobdir = local_env
    be = make()
    u = uuid(13)
    record = jobdir / f"{u}.job"
    record.write_text(json.dumps({"pid": 0, "launching": True,
                                  "launching_at": time.time() - 60}))
    jobs = listed(be)
    assert jobs[u].pending  # first miss: still counted as launching, not started again
    rec = json.loads(record.read_text())
    assert rec["launching"] and rec["launch_missed_at"]
    # a while later (backdate the first miss rather than wait) it is launched again
    (jobdir / f"{u}.sh").write_text("#!/bin/sh\nexec sleep 30\n")
    record.write_text(json.dumps({**rec, "launch_missed_at": rec["launch_missed_at"] - 60}))
    jobs = listed(be)
    assert jobs[u].state == "RUNNING"
    core_run(be.cancel(u, jobs[u]))
    wait_for(lambda: u not in listed(be))
