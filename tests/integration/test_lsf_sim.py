"""The LSF simulator itself: texts, JSON shapes, scheduling, pending reasons, kills, faults.

These pin down what the dispatcher relies on, so that the dispatcher's tests against the
simulator mean something.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.helpers.lsf import LsfSim

FMT = "jobid stat job_name pend_reason"


def run(s: LsfSim, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                          env=s.env(), timeout=30)


def bjobs(s: LsfSim) -> dict[str, dict[str, str]]:
    res = run(s, "bjobs", "-u", "all", "-o", FMT, "-json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["COMMAND"] == "bjobs" and doc["JOBS"] == len(doc["RECORDS"])
    return {r["JOB_NAME"]: r for r in doc["RECORDS"]}


def test_submit_run_output_files_and_report(lsf_sim: LsfSim, tmp_path: Path) -> None:
    res = run(lsf_sim, "bsub", "-J", "hello", "-o", f"{tmp_path}/out.%J", "-e",
              f"{tmp_path}/err.%J", stdin="#!/bin/sh\necho out $LSB_JOBNAME\necho err >&2\n")
    assert res.returncode == 0
    assert res.stdout == "Job <101> is submitted to default queue <normal>.\n"
    lsf_sim.wait_for(lambda: "hello" not in bjobs(lsf_sim), what="job to finish")
    out = (tmp_path / "out.101").read_text()
    assert out.startswith("out hello\n") and "Successfully completed." in out
    assert (tmp_path / "err.101").read_text() == "err\n"
    assert lsf_sim.jobs()[0]["stat"] == "DONE"


def test_json_layout_is_lsfs(lsf_sim: LsfSim) -> None:
    run(lsf_sim, "bsub", "-J", "a", stdin="sleep 30\n")
    res = run(lsf_sim, "bjobs", "-u", "all", "-o", FMT, "-json")
    assert res.stdout.startswith('{\n  "COMMAND":"bjobs",\n  "JOBS":1,\n  "RECORDS":[\n    {\n')
    assert '      "JOBID":"101",\n' in res.stdout
    empty = LsfSim(lsf_sim.state_dir.parent / "other")
    res = run(empty, "bjobs", "-u", "all", "-o", FMT, "-json")
    assert json.loads(res.stdout) == {"COMMAND": "bjobs", "JOBS": 0, "RECORDS": []}
    res = run(empty, "bjobs")
    assert res.stderr == "No unfinished job found\n"
    res = run(empty, "bjobs", "-json")
    assert res.returncode != 0 and "-o" in res.stderr


def test_pending_reasons(lsf_sim_factory) -> None:  # type: ignore[no-untyped-def]
    s = lsf_sim_factory(hosts=[{"name": "h1", "slots": 2, "mem_mb": 1000, "tmp_mb": 1000,
                                "gpus": 0}])
    run(s, "bsub", "-J", "big", "-n", "4", stdin="true\n")
    run(s, "bsub", "-J", "run", "-n", "2", stdin="sleep 30\n")
    run(s, "bsub", "-J", "slot", "-n", "1", stdin="true\n")
    run(s, "bsub", "-J", "gpu", "-gpu", "num=1", stdin="true\n")
    jobs = bjobs(s)
    assert jobs["big"]["PEND_REASON"] == "There are no suitable hosts for the job;"
    assert jobs["run"]["STAT"] == "RUN" and jobs["run"]["PEND_REASON"] == ""
    assert jobs["slot"]["PEND_REASON"] == "Not enough job slot(s): 1 host;"
    assert jobs["gpu"]["STAT"] == "PEND"
    assert jobs["gpu"]["PEND_REASON"] == "There are no suitable hosts for the job;"


def test_memory_reservation_pending_reason(lsf_sim_factory) -> None:  # type: ignore[no-untyped-def]
    s = lsf_sim_factory(hosts=[{"name": "h1", "slots": 4, "mem_mb": 1000, "tmp_mb": 1000,
                                "gpus": 0}])
    run(s, "bsub", "-J", "m1", "-R", "rusage[mem=800MB]", stdin="sleep 30\n")
    run(s, "bsub", "-J", "m2", "-R", "rusage[mem=800MB] span[hosts=1]", stdin="sleep 30\n")
    jobs = bjobs(s)
    assert jobs["m1"]["STAT"] == "RUN"
    assert jobs["m2"]["PEND_REASON"] == \
        "Job requirements for reserving resource (mem) not satisfied: 1 host;"
    # When m1 ends, m2 starts without anyone submitting anything (the wrapper's pass).
    run(s, "bkill", jobs["m1"]["JOBID"])
    s.wait_for(lambda: bjobs(s).get("m2", {}).get("STAT") == "RUN", what="m2 to start")


def test_resource_requirements_and_gpu_allocation(lsf_sim: LsfSim, tmp_path: Path) -> None:
    res = run(lsf_sim, "bsub", "-J", "g", "-n", "2", "-D", "100MB", "-o", f"{tmp_path}/g.%J",
              "-R", "rusage[mem=1000MB:tmp=1000MB] span[hosts=1]", "-R", "select[mem>=1000MB]",
              "-R", "select[tmp>=1000MB]", "-R", "select[ncpus>=2]", "-We", "8",
              "-gpu", "num=2", stdin="echo gpus=$CUDA_VISIBLE_DEVICES host=$LSFSIM_HOST\n")
    assert res.returncode == 0, res.stderr
    lsf_sim.wait_for(lambda: "g" not in bjobs(lsf_sim))
    assert (tmp_path / "g.101").read_text().startswith("gpus=0,1 host=lsfhost2\n")
    job = lsf_sim.jobs()[0]
    assert (job["slots"], job["mem_mb"], job["tmp_mb"], job["gpus"], job["estimate_min"]) == \
        (2, 1000, 1000, 2, 8)


def test_submission_errors(lsf_sim: LsfSim) -> None:
    cases = [
        (["-q", "nope"], "nope: No such queue. Job not submitted.\n"),
        (["-R", "rusage[mem=]"], "Bad resource requirement syntax. Job not submitted.\n"),
        (["-R", "select[bogus>1]"], "bogus: Unknown resource name. Job not submitted.\n"),
        (["-n", "x"], "x: Bad argument for option -n. Job not submitted.\n"),
        (["-Z"], "bsub: illegal option -- Z\n"),
    ]
    for args, err in cases:
        res = run(lsf_sim, "bsub", *args, stdin="true\n")
        assert res.returncode == 255 and res.stderr.startswith(err), (args, res.stderr)
    assert lsf_sim.jobs() == []


def test_bsub_directives_in_script(lsf_sim: LsfSim) -> None:
    run(lsf_sim, "bsub", "-J", "cmdline", stdin="#!/bin/sh\n#BSUB -J fromscript\n#BSUB -n 3\n"
        "sleep 30\n#BSUB -q short\n")
    job = lsf_sim.jobs()[0]
    # Command line wins; directives after the first command are not directives.
    assert (job["name"], job["slots"], job["queue"]) == ("cmdline", 3, "normal")


def test_bkill_texts(lsf_sim: LsfSim) -> None:
    lsf_sim.configure(kill_grace_s=0.5)
    run(lsf_sim, "bsub", "-J", "sleeper", stdin="trap '' INT TERM; sleep 60\n")
    lsf_sim.wait_for(lambda: bjobs(lsf_sim).get("sleeper", {}).get("STAT") == "RUN")
    res = run(lsf_sim, "bkill", "101")
    assert (res.returncode, res.stdout) == (0, "Job <101> is being terminated\n")
    # Ignoring TERM only delays the end: SIGKILL follows after the grace period.
    lsf_sim.wait_for(lambda: "sleeper" not in bjobs(lsf_sim), what="SIGKILL escalation")
    res = run(lsf_sim, "bkill", "101")
    assert (res.returncode, res.stderr) == (255, "Job <101>: Job has already finished\n")
    res = run(lsf_sim, "bkill", "999")
    assert (res.returncode, res.stderr) == (255, "Job <999>: No matching job found\n")
    assert lsf_sim.jobs()[0]["stat"] == "EXIT"


def test_faults(lsf_sim: LsfSim) -> None:
    lsf_sim.inject("bjobs", "fail", message="LSF is down. Please wait ...", count=2)
    for _ in range(2):
        res = run(lsf_sim, "bjobs", "-u", "all", "-o", FMT, "-json")
        assert (res.returncode, res.stderr) == (255, "LSF is down. Please wait ...\n")
    assert run(lsf_sim, "bjobs", "-u", "all", "-o", FMT, "-json").returncode == 0
    lsf_sim.inject("bjobs", "banner", message="Warning: something")
    res = run(lsf_sim, "bjobs", "-u", "all", "-o", FMT, "-json")
    assert res.stdout.startswith("Warning: something\n{")
    lsf_sim.inject("bsub", "fail_after_submit")
    res = run(lsf_sim, "bsub", "-J", "lost", stdin="true\n")
    assert res.returncode == 255 and lsf_sim.jobs_named("lost")
    calls = lsf_sim.calls("bsub")
    assert calls[-1]["argv"] == ["-J", "lost"]


def test_checked_in_executables_use_lsfsim_state(lsf_sim: LsfSim) -> None:
    # tests/lsfsim/{bsub,bjobs,bkill} themselves (not the fixture's fast shims), for manual use.
    here = Path(__file__).resolve().parents[1] / "lsfsim"
    env = lsf_sim.env()
    res = subprocess.run([str(here / "bsub"), "-J", "manual"], input="true\n", text=True,
                         capture_output=True, env=env, timeout=30)
    assert res.stdout == "Job <101> is submitted to default queue <normal>.\n"
    res = subprocess.run([str(here / "bjobs"), "-a", "-u", "all", "-o", "job_name", "-json"],
                         text=True, capture_output=True, env=env, timeout=30)
    assert json.loads(res.stdout)["RECORDS"] == [{"JOB_NAME": "manual"}]
