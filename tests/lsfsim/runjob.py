"""Execution wrapper for one simulated LSF job (what sbatchd/res do on a real execution host).

Started detached by the scheduler: ``python3 -S runjob.py STATE_DIR JOBID``. It runs the job
script with the submission environment plus LSF's ``LSB_*`` variables, sends stdout/stderr to the
``-o``/``-e`` files, forwards a kill (SIGTERM from ``bkill``) as SIGINT+SIGTERM and then SIGKILL
after ``kill_grace_s``, records the exit status, appends LSF's job report to the output file,
and runs one scheduler pass so that waiting jobs can start on the freed resources.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.lsfsim import sim  # noqa: E402

_kill_requested = False


def _on_term(signum: int, frame: object) -> None:
    global _kill_requested
    _kill_requested = True


def main(state_dir: str, jid: str) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    d = Path(state_dir)
    s = sim.Sim(d)
    with s.locked():
        job = dict(s.jobs[jid])
        if job.get("kill_requested"):
            sim.finish(s, jid, 130, job["kill_requested"])
            return 0
    env = json.loads((d / "jobs" / f"{jid}.env.json").read_text())
    env.update({
        "LSB_JOBID": jid, "LSB_JOBNAME": job["name"], "LSB_QUEUE": job["queue"],
        "LSB_HOSTS": " ".join([job["host"]] * job["slots"]),
        "LSB_MCPU_HOSTS": f"{job['host']} {job['slots']}", "LSB_DJOB_NUMPROC": str(job["slots"]),
        "LSFSIM_HOST": job["host"],
    })
    env.pop("LSFSIM_STATE", None)
    if job["gpus"]:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in job["gpu_ids"])
    out_path = sim.expand_path(job["out"], jid) if job["out"] else str(d / "jobs" / f"{jid}.out")
    err_path = sim.expand_path(job["err"], jid) if job["err"] else out_path
    cwd = job["cwd"] if os.path.isdir(job["cwd"]) else "/tmp"
    out = open(out_path, "ab")
    err = out if err_path == out_path else open(err_path, "ab")
    child = subprocess.Popen(
        ["/bin/sh", str(d / "jobs" / f"{jid}.sh")],
        stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd,
        start_new_session=True,
    )
    with s.locked():
        s.jobs[jid]["job_pid"] = child.pid
        s.touch()
    killed_at = None
    grace = float(s.cfg.get("kill_grace_s", 10))
    while True:
        try:
            rc = child.wait(timeout=0.05)
            break
        except subprocess.TimeoutExpired:
            pass
        if _kill_requested and killed_at is None:
            killed_at = time.monotonic()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    os.killpg(child.pid, sig)
                except ProcessLookupError:
                    pass
        if killed_at is not None and time.monotonic() - killed_at > grace:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    exit_code = rc if rc >= 0 else 128 - rc
    with s.locked():
        reason = s.jobs[jid].get("kill_requested", "") if jid in s.jobs else ""
        if jid in s.jobs:
            sim.finish(s, jid, exit_code, reason)
        report = (
            "\n------------------------------------------------------------\n"
            f"Sender: LSF System <lsfadmin@{job['host']}>\n"
            f"Subject: Job {jid}: <{job['name']}> in cluster <{sim.CLUSTER}> "
            f"{'Done' if exit_code == 0 and not reason else 'Exited'}\n\n"
            f"Job <{job['name']}> was submitted from host <{job['from_host']}> by user "
            f"<{job['user']}> in cluster <{sim.CLUSTER}>.\n"
            f"Job was executed on host(s) <{job['host']}>, in queue <{job['queue']}>.\n"
            + ("Successfully completed.\n" if exit_code == 0 and not reason
               else f"Exited with exit code {exit_code}.\n")
        )
        out.write(report.encode())
        out.close()
        if err is not out:
            err.close()
        sim.schedule(s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
