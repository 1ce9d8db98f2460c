"""A small, faithful simulator of IBM Spectrum LSF's ``bsub`` / ``bjobs`` / ``bkill``.

No free LSF exists, so the LSF dispatcher is tested against this. It reproduces, for everything
the dispatcher uses, what real LSF prints and does:

* ``bsub`` reads the job script on stdin (``#BSUB`` directives honoured), validates ``-R`` / ``-q``
  / ``-n`` / ``-gpu`` and answers ``Job <N> is submitted to queue <normal>.`` or an error ending
  in ``Job not submitted.`` on stderr;
* ``bjobs -u all -o "jobid stat job_name pend_reason" -json`` prints LSF's pretty JSON
  (``COMMAND`` / ``JOBS`` / ``RECORDS``); plain ``bjobs`` prints the table;
* ``bkill N`` says ``Job <N> is being terminated``, ``Job <N>: Job has already finished`` or
  ``Job <N>: No matching job found``;
* accepted jobs run as detached local processes on fake hosts (slots, memory, tmp, GPUs), with
  stdout/stderr in the ``-o`` / ``-e`` files (``%J`` expanded); jobs that do not fit stay ``PEND``
  with an LSF pending reason.

State lives in one directory (``lsfsim.json`` config, ``state.json`` jobs, ``jobs/`` scripts),
guarded by an ``flock`` so concurrent commands are safe. There is no daemon: every command
invocation, and every job that finishes, runs one scheduler pass. Faults are injected by writing
``faults/<command>.json`` (see :func:`take_fault`).

Only the standard library is used, so the commands start fast under ``python3 -S``.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIG_FILE = "lsfsim.json"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
CLUSTER = "lsfsim"

DEFAULT_CONFIG: dict[str, Any] = {
    "hosts": [
        {"name": "lsfhost1", "slots": 4, "mem_mb": 16384, "tmp_mb": 102400, "gpus": 0},
        {"name": "lsfhost2", "slots": 4, "mem_mb": 16384, "tmp_mb": 102400, "gpus": 2},
    ],
    "queues": ["normal", "short"],
    "default_queue": "normal",
    # Seconds between SIGINT/SIGTERM and SIGKILL when a running job is killed
    # (LSF's JOB_TERMINATE_INTERVAL, 10 s by default).
    "kill_grace_s": 2.0,
    # A job younger than this stays "New job is waiting for scheduling;".
    "dispatch_delay_s": 0.0,
    # Finished jobs are forgotten after this (LSF's CLEAN_PERIOD).
    "clean_period_s": 3600.0,
}

UNITS_MB = {"": 1.0, "K": 1 / 1024, "KB": 1 / 1024, "M": 1.0, "MB": 1.0, "G": 1024.0,
            "GB": 1024.0, "T": 1024.0 * 1024, "TB": 1024.0 * 1024}


class SimError(Exception):
    """A user error that the real command reports on stderr (exit 255)."""


# --- state directory ---------------------------------------------------------------------------


def init_state_dir(state_dir: str | os.PathLike[str], config: dict[str, Any] | None = None) -> Path:
    """Create a fresh simulator state directory with ``config`` merged over the defaults."""
    d = Path(state_dir)
    (d / "jobs").mkdir(parents=True, exist_ok=True)
    (d / "faults").mkdir(exist_ok=True)
    cfg = dict(DEFAULT_CONFIG)
    cfg.update(config or {})
    (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    if not (d / STATE_FILE).exists():
        (d / STATE_FILE).write_text(json.dumps({"next_id": 101, "jobs": {}}))
    return d


def state_dir_for(argv0: str) -> Path:
    """The state directory: ``$LSFSIM_STATE``, else the parent of the ``bin/`` we were run from."""
    env = os.environ.get("LSFSIM_STATE")
    if env:
        return Path(env)
    guess = Path(argv0).absolute().parent.parent
    if (guess / CONFIG_FILE).exists():
        return guess
    raise SimError("lsfsim: set LSFSIM_STATE to the simulator's state directory")


class Sim:
    """One open simulator: config + job table, under the directory lock while in ``locked()``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.cfg: dict[str, Any] = json.loads((state_dir / CONFIG_FILE).read_text())
        self.state: dict[str, Any] = {}
        self._dirty = False

    @contextlib.contextmanager
    def locked(self) -> Iterator[Sim]:
        with open(self.dir / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.state = json.loads((self.dir / STATE_FILE).read_text())
                self._dirty = False
                yield self
                if self._dirty:
                    tmp = self.dir / (STATE_FILE + ".tmp")
                    tmp.write_text(json.dumps(self.state, separators=(",", ":")))
                    os.replace(tmp, self.dir / STATE_FILE)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def touch(self) -> None:
        self._dirty = True

    @property
    def jobs(self) -> dict[str, dict[str, Any]]:
        jobs: dict[str, dict[str, Any]] = self.state["jobs"]
        return jobs


def take_fault(sim_dir: Path, command: str) -> dict[str, Any] | None:
    """Return the fault injected for ``command`` (``faults/<command>.json``), if any.

    A fault file holds ``{"mode": "fail"|"hang"|"banner"|"fail_after_submit", "message": str,
    "exit": int, "seconds": float, "count": int}``. With ``count`` the fault fires that many times
    and then disappears (the count is decremented under the lock); without it, it stays until the
    test removes the file.
    """
    path = sim_dir / "faults" / f"{command}.json"
    if not path.exists():
        return None
    # "probability": p makes the fault fire at random (the reference's 10% flaky stub).
    try:
        p = json.loads(path.read_text() or "{}").get("probability")
    except (OSError, ValueError):
        p = None
    if p is not None and random.random() >= float(p):
        return None
    with open(sim_dir / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                fault: dict[str, Any] = json.loads(path.read_text() or "{}")
            except FileNotFoundError:
                return None
            except json.JSONDecodeError:
                fault = {"mode": "fail"}
            count = fault.get("count")
            if isinstance(count, int):
                if count <= 1:
                    path.unlink(missing_ok=True)
                else:
                    path.write_text(json.dumps(dict(fault, count=count - 1)))
            return fault
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- resource requirement strings --------------------------------------------------------------


def parse_size_mb(text: str) -> float:
    """``11701MB`` / ``16G`` / ``512`` (LSF's default unit here: MB) -> megabytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * UNITS_MB[m.group(2).upper()]


_SECTION = re.compile(r"(select|rusage|span|order|same|cu|affinity)\s*\[([^\[\]]*)\]\s*")
_COND = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|=|>|<)\s*([0-9.]+[A-Za-z]*)\s*")
KNOWN_RESOURCES = {"mem", "tmp", "ncpus", "maxmem", "maxtmp", "ngpus", "ngpus_physical", "slots",
                   "swp", "maxswp"}


def parse_resreq(text: str, req: dict[str, Any]) -> None:
    """Merge one ``-R`` string into ``req`` (select list, rusage dict, span_hosts).

    Raises :class:`SimError` with LSF's message for syntax errors and unknown resources.
    """
    pos = 0
    text = text.strip()
    if text and "[" not in text:
        # A bare string is a select expression ("mem>1000").
        text = f"select[{text}]"
    while pos < len(text):
        m = _SECTION.match(text, pos)
        if not m:
            raise SimError("Bad resource requirement syntax. Job not submitted.")
        kind, body = m.group(1), m.group(2)
        pos = m.end()
        if kind == "select":
            for part in re.split(r"&&|\band\b", body):
                if not part.strip():
                    continue
                c = _COND.fullmatch(part)
                if not c:
                    raise SimError("Bad resource requirement syntax. Job not submitted.")
                name, op, value = c.groups()
                if name not in KNOWN_RESOURCES:
                    raise SimError(f"{name}: Unknown resource name. Job not submitted.")
                try:
                    req["select"].append((name, op, parse_size_mb(value)))
                except ValueError:
                    raise SimError("Bad resource requirement syntax. Job not submitted.") from None
        elif kind == "rusage":
            for part in re.split(r"[:,]", body):
                if not part.strip():
                    continue
                kv = part.split("=", 1)
                if len(kv) != 2 or not kv[0].strip():
                    raise SimError("Bad resource requirement syntax. Job not submitted.")
                name = kv[0].strip()
                if name not in KNOWN_RESOURCES:
                    raise SimError(f"{name}: Unknown resource name. Job not submitted.")
                try:
                    req["rusage"][name] = parse_size_mb(kv[1])
                except ValueError:
                    raise SimError("Bad resource requirement syntax. Job not submitted.") from None
        elif kind == "span":
            hm = re.fullmatch(r"\s*hosts\s*=\s*(-?\d+)\s*|\s*ptile\s*=\s*\d+\s*", body)
            if not hm:
                raise SimError("Bad resource requirement syntax. Job not submitted.")
            if hm.group(1) is not None:
                req["span_hosts"] = int(hm.group(1))
        # order[], same[], cu[], affinity[] are accepted and ignored.


def _compare(have: float, op: str, want: float) -> bool:
    return {
        ">=": have >= want, "<=": have <= want, ">": have > want, "<": have < want,
        "==": have == want, "=": have == want, "!=": have != want,
    }[op]


# --- bsub ----------------------------------------------------------------------------------------

# Options taking a value (a subset of real bsub's, enough for any template a site writes).
VALUE_OPTS = {"-o", "-e", "-oo", "-eo", "-J", "-n", "-D", "-R", "-We", "-W", "-q", "-gpu", "-M",
              "-cwd", "-P", "-G", "-app", "-u", "-m", "-w", "-c", "-F", "-g", "-sp", "-L", "-i",
              "-E", "-Ep", "-S", "-v", "-Jd", "-ptl", "-C"}
FLAG_OPTS = {"-x", "-N", "-B", "-r", "-rn", "-H", "-I", "-Ip", "-Is", "-K", "-env"}
USAGE = "Usage: bsub [options] command [arguments]\n"


def parse_bsub_args(args: list[str], opts: dict[str, list[str]]) -> list[str]:
    """Parse bsub options into ``opts`` (name -> values); return the command words."""
    i = 0
    while i < len(args):
        a = args[i]
        if a in VALUE_OPTS:
            if i + 1 >= len(args):
                raise SimError(f"bsub: option requires an argument -- {a[1:]}\n{USAGE}")
            opts.setdefault(a, []).append(args[i + 1])
            i += 2
        elif a in FLAG_OPTS:
            opts.setdefault(a, []).append("")
            i += 1
        elif a.startswith("-") and a != "-":
            raise SimError(f"bsub: illegal option -- {a[1:]}\n{USAGE}")
        else:
            return args[i:]
    return []


def bsub_directives(script: str) -> list[str]:
    """``#BSUB`` lines at the top of a script, as argv words (LSF stops at the first command)."""
    words: list[str] = []
    for line in script.splitlines()[1:] if script.startswith("#!") else script.splitlines():
        s = line.strip()
        if not s:
            continue
        if s.startswith("#BSUB"):
            try:
                words += shlex.split(s[len("#BSUB"):])
            except ValueError:
                raise SimError("Bad #BSUB directive syntax. Job not submitted.") from None
        elif s.startswith("#"):
            continue
        else:
            break
    return words


def build_job(sim: Sim, argv: list[str], script: str, env: dict[str, str], cwd: str) -> dict[str, Any]:
    """Validate a submission and return the job record (without id). Raises SimError."""
    opts: dict[str, list[str]] = {}
    command = parse_bsub_args(argv, opts)
    if not command:
        if not script.strip():
            raise SimError("No command is specified. Job not submitted.")
        # Command-line options win over #BSUB directives.
        directive_opts: dict[str, list[str]] = {}
        parse_bsub_args(bsub_directives(script), directive_opts)
        for k, v in directive_opts.items():
            opts.setdefault(k, v)
    else:
        script = "#!/bin/sh\n" + " ".join(shlex.quote(w) for w in command) + "\n"

    def last(name: str, default: str = "") -> str:
        return opts.get(name, [default])[-1]

    queue = last("-q", sim.cfg["default_queue"])
    if queue not in sim.cfg["queues"]:
        raise SimError(f"{queue}: No such queue. Job not submitted.")
    nslots = 1
    if "-n" in opts:
        n = last("-n").split(",")[-1]
        if not re.fullmatch(r"\d+", n) or int(n) < 1:
            raise SimError(f"{last('-n')}: Bad argument for option -n. Job not submitted.")
        nslots = int(n)
    req: dict[str, Any] = {"select": [], "rusage": {}, "span_hosts": 0}
    for r in opts.get("-R", []):
        parse_resreq(r, req)
    gpus = 0
    if "-gpu" in opts and last("-gpu") != "-":
        g = {}
        for part in last("-gpu").split(":"):
            kv = part.split("=", 1)
            if len(kv) != 2:
                raise SimError("The GPU requirement string is not valid. Job not submitted.")
            g[kv[0].strip()] = kv[1].strip()
        if not re.fullmatch(r"\d+", g.get("num", "1")):
            raise SimError("The GPU requirement string is not valid. Job not submitted.")
        gpus = int(g.get("num", "1"))
    limits: dict[str, float] = {}
    for opt, key_ in (("-W", "run_limit_min"), ("-We", "estimate_min")):
        if opt in opts:
            lim = last(opt)
            m = re.fullmatch(r"(?:(\d+):)?(\d+)", lim)
            if not m:
                raise SimError(f"{lim}: Bad argument for option {opt}. Job not submitted.")
            limits[key_] = int(m.group(1) or 0) * 60 + int(m.group(2))
    data_limit_mb = None
    if "-D" in opts:
        try:
            data_limit_mb = parse_size_mb(last("-D"))
        except ValueError:
            raise SimError(f"{last('-D')}: Bad argument for option -D. Job not submitted.") from None
    return {
        "name": last("-J") or (command[0] if command else script.splitlines()[-1][:60]),
        "queue": queue,
        "user": getpass.getuser(),
        "from_host": socket.gethostname(),
        "stat": "PEND",
        "pend_reason": "New job is waiting for scheduling;",
        "submit_time": time.time(),
        "slots": nslots,
        "mem_mb": req["rusage"].get("mem", 0.0),
        "tmp_mb": req["rusage"].get("tmp", 0.0),
        "gpus": gpus,
        "select": req["select"],
        "data_limit_mb": data_limit_mb,
        "out": last("-o") or last("-oo"),
        "err": last("-e") or last("-eo"),
        "cwd": last("-cwd") or cwd,
        "argv": argv,
        **limits,
        "_script": script,
        "_env": env,
    }


def submit(sim: Sim, job: dict[str, Any]) -> str:
    """Store a validated job; return its id. Caller holds the lock."""
    jid = str(sim.state["next_id"])
    sim.state["next_id"] += 1
    script, env = job.pop("_script"), job.pop("_env")
    (sim.dir / "jobs" / f"{jid}.sh").write_text(script)
    (sim.dir / "jobs" / f"{jid}.env.json").write_text(json.dumps(env))
    job["id"] = jid
    sim.jobs[jid] = job
    sim.touch()
    return jid


# --- the scheduler -----------------------------------------------------------------------------


def _host_usage(sim: Sim) -> dict[str, dict[str, float]]:
    used = {h["name"]: {"slots": 0.0, "mem": 0.0, "tmp": 0.0, "gpus": 0.0} for h in sim.cfg["hosts"]}
    for j in sim.jobs.values():
        if j["stat"] == "RUN" and j.get("host") in used:
            u = used[j["host"]]
            u["slots"] += j["slots"]
            u["mem"] += j["mem_mb"]
            u["tmp"] += j["tmp_mb"]
            u["gpus"] += j["gpus"]
    return used


def _resources(host: dict[str, Any], used: dict[str, float] | None) -> dict[str, float]:
    """Resource values a select[] sees: totals when ``used`` is None, else what is free."""
    u = used or {"slots": 0, "mem": 0, "tmp": 0, "gpus": 0}
    return {
        "ncpus": host["slots"], "slots": host["slots"] - u["slots"],
        "mem": host["mem_mb"] - u["mem"], "maxmem": host["mem_mb"],
        "tmp": host["tmp_mb"] - u["tmp"], "maxtmp": host["tmp_mb"],
        "ngpus": host.get("gpus", 0), "ngpus_physical": host.get("gpus", 0) - u["gpus"],
        "swp": 0, "maxswp": 0,
    }


def _why_not(job: dict[str, Any], host: dict[str, Any], used: dict[str, float] | None) -> str:
    """'' if ``job`` fits ``host`` (now, or ever when ``used`` is None), else LSF's reason."""
    r = _resources(host, used)
    if r["slots"] < job["slots"]:
        return "Not enough job slot(s)"
    for res, need in (("mem", job["mem_mb"]), ("tmp", job["tmp_mb"]),
                      ("ngpus_physical", job["gpus"])):
        if r[res] < need:
            return f"Job requirements for reserving resource ({res}) not satisfied"
    for name, op, want in job["select"]:
        if not _compare(r[name], op, want):
            return "Job's resource requirements not satisfied"
    return ""


def schedule(sim: Sim) -> None:
    """One scheduler pass: reap lost jobs, enforce run limits, dispatch pending jobs (FCFS)."""
    now = time.time()
    for jid, j in list(sim.jobs.items()):
        if j["stat"] == "RUN" and not _alive(j.get("wrapper_pid")) and not _alive(j.get("job_pid")):
            # The execution wrapper vanished without reporting (killed with the machine...).
            finish(sim, jid, 137, "TERM_ZOMBIE")
        elif j["stat"] == "RUN" and j.get("run_limit_min") and not j.get("kill_requested"):
            if now - j["start_time"] > j["run_limit_min"] * 60:
                request_kill(sim, jid, "TERM_RUNLIMIT")
        elif j["stat"] in ("DONE", "EXIT") and now - j.get("end_time", now) > sim.cfg["clean_period_s"]:
            del sim.jobs[jid]
            sim.touch()
    used = _host_usage(sim)
    hosts = sim.cfg["hosts"]
    pending = sorted((j for j in sim.jobs.values() if j["stat"] == "PEND"), key=lambda j: int(j["id"]))
    for j in pending:
        if now - j["submit_time"] < sim.cfg["dispatch_delay_s"]:
            continue
        reasons: dict[str, int] = {}
        chosen = None
        for h in hosts:
            if _why_not(j, h, None):
                reasons["Job's resource requirements not satisfied"] = (
                    reasons.get("Job's resource requirements not satisfied", 0) + 1)
                continue
            why = _why_not(j, h, used[h["name"]])
            if not why:
                chosen = h
                break
            reasons[why] = reasons.get(why, 0) + 1
        if chosen is None:
            if all(_why_not(j, h, None) for h in hosts):
                reason = "There are no suitable hosts for the job;"
            else:
                reason = " ".join(
                    f"{why}: {n} host{'s' if n != 1 else ''};" for why, n in reasons.items())
            if j["pend_reason"] != reason:
                j["pend_reason"] = reason
                sim.touch()
            continue
        u = used[chosen["name"]]
        u["slots"] += j["slots"]
        u["mem"] += j["mem_mb"]
        u["tmp"] += j["tmp_mb"]
        u["gpus"] += j["gpus"]
        start(sim, j, chosen)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); /proc tells the difference.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(sim: Sim, job: dict[str, Any], host: dict[str, Any]) -> None:
    """Dispatch ``job`` to ``host``: mark it RUN and start its execution wrapper, detached."""
    job["stat"] = "RUN"
    job["pend_reason"] = ""
    job["host"] = host["name"]
    job["start_time"] = time.time()
    gpus_used = sorted(
        g for o in sim.jobs.values() if o["stat"] == "RUN" and o.get("host") == host["name"]
        for g in o.get("gpu_ids", []))
    job["gpu_ids"] = [g for g in range(host.get("gpus", 0)) if g not in gpus_used][: job["gpus"]]
    proc = subprocess.Popen(
        [sys.executable, "-S", str(HERE / "runjob.py"), str(sim.dir), job["id"]],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )
    job["wrapper_pid"] = proc.pid
    sim.touch()


def finish(sim: Sim, jid: str, exit_code: int, term_reason: str = "") -> None:
    j = sim.jobs[jid]
    j["stat"] = "DONE" if exit_code == 0 and not term_reason else "EXIT"
    j["exit_code"] = exit_code
    j["end_time"] = time.time()
    j["term_reason"] = term_reason
    j["pend_reason"] = ""
    sim.touch()


def request_kill(sim: Sim, jid: str, reason: str = "TERM_OWNER") -> None:
    """Kill a job: a pending one ends at once, a running one gets its signals via the wrapper."""
    j = sim.jobs[jid]
    if j["stat"] == "PEND":
        finish(sim, jid, 130, reason)
        return
    j["kill_requested"] = reason
    sim.touch()
    pid = j.get("wrapper_pid")
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)


def expand_path(template: str, jid: str) -> str:
    """``-o``/``-e`` file names: ``%J`` is the job id, ``%I`` the array index (0)."""
    return template.replace("%J", jid).replace("%I", "0")


# --- output formats ------------------------------------------------------------------------------

BJOBS_FIELDS = {
    "jobid": lambda j: j["id"],
    "stat": lambda j: j["stat"],
    "job_name": lambda j: j["name"],
    "name": lambda j: j["name"],
    "pend_reason": lambda j: j.get("pend_reason", "") if j["stat"] == "PEND" else "",
    "queue": lambda j: j["queue"],
    "user": lambda j: j["user"],
    "from_host": lambda j: j["from_host"],
    "exec_host": lambda j: j.get("host", ""),
    "exit_code": lambda j: str(j["exit_code"]) if j.get("exit_code") else "",
    "nreq_slot": lambda j: str(j["slots"]),
    "slots": lambda j: str(j["slots"]) if j["stat"] == "RUN" else "",
    "submit_time": lambda j: time.strftime("%b %d %H:%M", time.localtime(j["submit_time"])),
    "exit_reason": lambda j: j.get("term_reason", ""),
}


def format_json(records: list[dict[str, str]]) -> str:
    """LSF's ``-json`` layout: two-space indent, no space after ':'."""
    lines = ["{", '  "COMMAND":"bjobs",', f'  "JOBS":{len(records)},', '  "RECORDS":[']
    for i, rec in enumerate(records):
        lines.append("    {")
        items = list(rec.items())
        for k, (key_, value) in enumerate(items):
            comma = "," if k < len(items) - 1 else ""
            lines.append(f"      {json.dumps(key_)}:{json.dumps(value, ensure_ascii=False)}{comma}")
        lines.append("    }" + ("," if i < len(records) - 1 else ""))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def format_table(jobs: list[dict[str, Any]]) -> str:
    out = [f"{'JOBID':<7} {'USER':<7} {'STAT':<5} {'QUEUE':<10} {'FROM_HOST':<11} "
           f"{'EXEC_HOST':<11} {'JOB_NAME':<10} SUBMIT_TIME"]
    for j in jobs:
        out.append(
            f"{j['id']:<7} {j['user'][:7]:<7} {j['stat']:<5} {j['queue']:<10} "
            f"{j['from_host'][:11]:<11} {j.get('host', ''):<11} {j['name'][:10]:<10} "
            f"{BJOBS_FIELDS['submit_time'](j)}")
    return "\n".join(out) + "\n"


# --- commands ------------------------------------------------------------------------------------


def _apply_fault(sim_dir: Path, command: str) -> tuple[dict[str, Any] | None, int | None]:
    """Run the injected fault for ``command``; returns (fault, exit code if the command stops)."""
    fault = take_fault(sim_dir, command)
    if not fault:
        return None, None
    mode = fault.get("mode", "fail")
    if mode == "hang":
        time.sleep(float(fault.get("seconds", 3600)))
        if fault.get("then") != "continue":
            return fault, 255
    if mode == "fail":
        sys.stderr.write(fault.get("message", f"{command}: simulated failure") + "\n")
        return fault, int(fault.get("exit", 255))
    if mode == "banner":
        sys.stdout.write(fault.get("message", "LSF is processing your request. Please wait ...") + "\n")
    return fault, None


def cmd_bsub(sim_dir: Path, argv: list[str]) -> int:
    fault, code = _apply_fault(sim_dir, "bsub")
    if code is not None:
        return code
    script = sys.stdin.read() if not sys.stdin.isatty() else ""
    sim = Sim(sim_dir)
    env = dict(os.environ)
    with sim.locked():
        try:
            job = build_job(sim, argv, script, env, os.getcwd())
        except SimError as e:
            sys.stderr.write(str(e).rstrip("\n") + "\n")
            return 255
        jid = submit(sim, job)
        schedule(sim)
        queue = job["queue"]
        default = "-q" not in argv
    if fault and fault.get("mode") == "fail_after_submit":
        # The job exists, but the submitter sees an error (lost reply, timeout...).
        sys.stderr.write(fault.get("message", "Batch system not responding. Job not submitted.") + "\n")
        return 255
    if fault and fault.get("mode") == "hang_after_submit":
        time.sleep(float(fault.get("seconds", 3600)))
    # Real bsub says "default queue" when the queue was not chosen with -q.
    where = "default queue" if default else "queue"
    sys.stdout.write(f"Job <{jid}> is submitted to {where} <{queue}>.\n")
    return 0


def cmd_bjobs(sim_dir: Path, argv: list[str]) -> int:
    _, code = _apply_fault(sim_dir, "bjobs")
    if code is not None:
        return code
    user = getpass.getuser()
    fields: list[str] | None = None
    as_json = show_all = False
    name = None
    ids: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-u":
            user = argv[i + 1]
            i += 2
        elif a == "-o":
            fields = argv[i + 1].split()
            i += 2
        elif a == "-J":
            name = argv[i + 1]
            i += 2
        elif a == "-json":
            as_json = True
            i += 1
        elif a in ("-a", "-d"):
            show_all = True
            i += 1
        elif a in ("-w", "-noheader", "-p", "-r"):
            i += 1
        elif a.startswith("-"):
            sys.stderr.write(f"bjobs: illegal option -- {a[1:]}\n")
            return 255
        else:
            ids.append(a)
            i += 1
    if as_json and fields is None:
        sys.stderr.write("bjobs: The -json option must be used with the -o option.\n")
        return 255
    for f in fields or []:
        if f.split(":")[0].lower() not in BJOBS_FIELDS:
            sys.stderr.write(f"{f}: Illegal field name.\n")
            return 255
    sim = Sim(sim_dir)
    with sim.locked():
        schedule(sim)
        jobs = sorted(sim.jobs.values(), key=lambda j: int(j["id"]))
    missing: list[str] = []
    if ids:
        by_id = {j["id"]: j for j in jobs}
        selected = []
        for x in ids:
            if x in by_id:
                selected.append(by_id[x])
            else:
                missing.append(x)
    else:
        selected = [
            j for j in jobs
            if (show_all or j["stat"] not in ("DONE", "EXIT"))
            and (user == "all" or j["user"] == user)
            and (name is None or j["name"] == name)
        ]
    if as_json:
        records: list[dict[str, str]] = []
        for j in selected:
            records.append({f.split(":")[0].upper(): BJOBS_FIELDS[f.split(":")[0].lower()](j)
                            for f in fields or []})
        for x in missing:
            records.append({"JOBID": x, "ERROR": f"Job <{x}> is not found"})
        sys.stdout.write(format_json(records))
        return 0
    for x in missing:
        sys.stderr.write(f"Job <{x}> is not found\n")
    if not selected:
        if not ids:
            sys.stderr.write("No unfinished job found\n" if not show_all else "No job found\n")
        return 255 if missing else 0
    if fields:
        sys.stdout.write(" ".join(f.upper() for f in fields) + "\n")
        for j in selected:
            sys.stdout.write(" ".join(BJOBS_FIELDS[f.lower()](j) or "-" for f in fields) + "\n")
    else:
        sys.stdout.write(format_table(selected))
    return 255 if missing else 0


def cmd_bkill(sim_dir: Path, argv: list[str]) -> int:
    _, code = _apply_fault(sim_dir, "bkill")
    if code is not None:
        return code
    ids: list[str] = []
    name = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-J":
            name = argv[i + 1]
            i += 2
        elif a in ("-s", "-u", "-q", "-m"):
            i += 2
        elif a.startswith("-"):
            i += 1
        else:
            ids.append(a)
            i += 1
    if not ids and name is None:
        sys.stderr.write("Usage: bkill [options] [jobId | \"jobId[index_list]\" ...]\n")
        return 255
    rc = 0
    sim = Sim(sim_dir)
    with sim.locked():
        if name is not None:
            ids += [j["id"] for j in sim.jobs.values()
                    if j["name"] == name and j["stat"] in ("PEND", "RUN")]
            if not ids:
                sys.stderr.write("No unfinished job found\n")
                return 255
        for x in ids:
            j = sim.jobs.get(x)
            if not re.fullmatch(r"\d+", x):
                sys.stderr.write(f"{x}: Illegal job ID.\n")
                rc = 255
            elif j is None:
                sys.stderr.write(f"Job <{x}>: No matching job found\n")
                rc = 255
            elif j["stat"] in ("DONE", "EXIT"):
                sys.stderr.write(f"Job <{x}>: Job has already finished\n")
                rc = 255
            else:
                request_kill(sim, x)
                sys.stdout.write(f"Job <{x}> is being terminated\n")
        schedule(sim)
    return rc


def log_call(sim_dir: Path, command: str, args: list[str]) -> None:
    """Append this invocation to ``calls.jsonl`` (tests count and check the commands run)."""
    line = json.dumps({"t": time.time(), "command": command, "argv": args}) + "\n"
    fd = os.open(sim_dir / "calls.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


COMMANDS = {"bsub": cmd_bsub, "bjobs": cmd_bjobs, "bkill": cmd_bkill}


def main(command: str, argv: list[str] | None = None, state_dir: str | None = None) -> int:
    """Entry point of the ``bsub`` / ``bjobs`` / ``bkill`` executables."""
    args = sys.argv[1:] if argv is None else argv
    try:
        d = Path(state_dir) if state_dir else state_dir_for(sys.argv[0])
        log_call(d, command, args)
        return COMMANDS[command](d, args)
    except SimError as e:
        sys.stderr.write(f"{e}\n")
        return 255
