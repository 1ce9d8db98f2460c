"""Pure parsers for Slurm command output: text in, records out. No I/O, no clocks.

Everything here is tested against output captured from a real Slurm 22.05 (see
``tests/unit/test_slurm_parse.py``).

squeue format
-------------
The dispatcher runs ONE ``squeue --all --noheader --states=all --format=<SQUEUE_FORMAT>`` per
poll. The fields that never contain blanks come first (job id, nice, priority, state,
partition), then the job name, then the pending reason as "the rest of the line" because Slurm
reasons may contain blanks (``ReqNodeNotAvail, UnavailableNodes:n1``). A job name with blanks is
therefore mis-split -- harmless, since only names that are container UUIDs matter to us.

``--states=all`` also lists jobs that ended less than ``MinJobAge`` ago, which is how the
dispatcher learns that a job ended with NODE_FAIL, TIMEOUT, OUT_OF_MEMORY ... without a second
command. Such rows are *ended*, not *present*: :func:`current_jobs` separates them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# %i job id, %y nice, %Q priority, %T state (long form), %P partition, %j name, %r reason.
SQUEUE_FORMAT = "%i %y %Q %T %P %j %r"

# Long state names (squeue %T). Compact codes (PD, R, ...) are accepted too, so a site that
# wraps squeue cannot silently turn every job into "unknown" (Parsl#2255).
_SHORT_STATES = {
    "BF": "BOOT_FAIL", "CA": "CANCELLED", "CD": "COMPLETED", "CF": "CONFIGURING",
    "CG": "COMPLETING", "DL": "DEADLINE", "F": "FAILED", "NF": "NODE_FAIL",
    "OOM": "OUT_OF_MEMORY", "PD": "PENDING", "PR": "PREEMPTED", "R": "RUNNING",
    "RD": "RESV_DEL_HOLD", "RF": "REQUEUE_FED", "RH": "REQUEUE_HOLD", "RQ": "REQUEUED",
    "RS": "RESIZING", "RV": "REVOKED", "SI": "SIGNALING", "SE": "SPECIAL_EXIT",
    "SO": "STAGE_OUT", "ST": "STOPPED", "S": "SUSPENDED", "TO": "TIMEOUT",
}

#: The job has ended; Slurm only still lists it because of MinJobAge.
ENDED_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
})
#: Ended states that mean "the job did not end the way crunch-run would have ended it".
BAD_END_STATES = frozenset({
    "BOOT_FAIL", "DEADLINE", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
})
#: Not started yet: scheduling_status applies.
PENDING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})

_SBATCH_RE = re.compile(r"^Submitted batch job (\d+)", re.MULTILINE)
_PARSABLE_RE = re.compile(r"^(\d+)(?:;\S+)?\s*$")


@dataclass(frozen=True)
class SqueueRow:
    """One line of our squeue format."""

    job_id: str
    nice: int
    priority: int
    state: str
    partition: str
    name: str
    reason: str

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @property
    def pending(self) -> bool:
        return self.state in PENDING_STATES


def _job_id_key(job_id: str) -> tuple[int, int]:
    """Sort key for ids like ``123`` and array tasks ``123_4``; unparseable ids sort first."""
    head, _, tail = job_id.partition("_")
    try:
        return int(head), int(tail) if tail.isdigit() else -1
    except ValueError:
        return -1, -1


def parse_squeue_line(line: str) -> SqueueRow | None:
    """Parse one line of :data:`SQUEUE_FORMAT` output; ``None`` if it does not parse."""
    parts = line.split(None, 6)
    if len(parts) < 6:
        return None
    job_id, nice_s, prio_s, state, partition, name = parts[:6]
    reason = parts[6].strip() if len(parts) > 6 else ""
    try:
        nice = int(nice_s)
        priority = int(prio_s)
    except ValueError:
        return None
    state = _SHORT_STATES.get(state, state)
    return SqueueRow(job_id, nice, priority, state, partition, name, reason)


def parse_squeue(text: str) -> tuple[list[SqueueRow], list[str]]:
    """All rows of squeue output, and the non-empty lines that did not parse."""
    rows: list[SqueueRow] = []
    bad: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = parse_squeue_line(line)
        if row is None:
            bad.append(line)
        else:
            rows.append(row)
    return rows, bad


def current_jobs(rows: Iterable[SqueueRow]) -> tuple[dict[str, SqueueRow], dict[str, SqueueRow]]:
    """Split rows into (present, ended), each keyed by job name.

    A name can appear several times: an ended job and its resubmission, or (after a lost sbatch
    reply) two live jobs. *present* keeps the live job with the highest id; *ended* keeps the
    most recent ended job of names that have no live job.
    """
    live: dict[str, SqueueRow] = {}
    ended: dict[str, SqueueRow] = {}
    for row in rows:
        target = ended if row.ended else live
        old = target.get(row.name)
        if old is None or _job_id_key(row.job_id) > _job_id_key(old.job_id):
            target[row.name] = row
    for name in live:
        ended.pop(name, None)
    return live, ended


def duplicate_live_jobs(rows: Iterable[SqueueRow]) -> dict[str, list[str]]:
    """Names with more than one live job, and their job ids (lowest first)."""
    seen: dict[str, list[str]] = {}
    for row in rows:
        if not row.ended:
            seen.setdefault(row.name, []).append(row.job_id)
    return {n: sorted(ids, key=_job_id_key) for n, ids in seen.items() if len(ids) > 1}


def parse_sbatch_job_id(stdout: str) -> str | None:
    """The job id from sbatch's stdout (``Submitted batch job 123`` or ``--parsable`` form)."""
    m = _SBATCH_RE.search(stdout)
    if m:
        return m.group(1)
    m = _PARSABLE_RE.match(stdout.strip())
    return m.group(1) if m else None


# --- error classification ---------------------------------------------------------------------

#: slurmctld is overloaded, restarting or unreachable: slow down, do not retry harder.
CONTROLLER_ERRORS = (
    "Socket timed out on send/recv operation",
    "Slurm temporarily unable to accept job",
    "Unable to contact slurm controller",
    "Slurm backup controller in standby mode",
    "Transient error",
    "Resource temporarily unavailable",
    "Zero Bytes were transmitted or received",
    "Communication connection failure",
    "Connection refused",
)

#: sbatch rejections that no retry can fix. Each is quoted to the user.
PERMANENT_SUBMIT_ERRORS = (
    "Requested node configuration is not available",
    "Invalid partition name specified",
    "invalid partition specified",
    "Invalid generic resource (gres) specification",
    "Memory specification can not be satisfied",
    "Temporary disk specification can not be satisfied",
    "Invalid feature specification",
    "Invalid account or account/partition combination specified",
    "Invalid qos specification",
    "Job violates accounting/QOS policy",
    "Requested partition configuration not available now",
    "More processors requested than permitted",
    "Node count specification invalid",
    "Requested time limit is invalid",
    "Invalid job array specification",
    "unrecognized option",
    "invalid option",
    "Invalid numeric value",
)

#: Limits that clear up on their own: keep the job back, do not fail the container.
QUOTA_ERRORS = (
    "QOSMaxSubmitJobPerUserLimit",
    "AssocMaxSubmitJobLimit",
    "Job violates accounting/QOS policy (job submit limit",
    "MaxJobCount",
    "Slurm job queue full",
)


def error_kind(stderr: str) -> str:
    """Classify a failed Slurm command's stderr: ``controller``, ``quota``, ``rejected`` or
    ``other``. Order matters: a QOS submit *limit* is transient even though the same line also
    says "violates accounting/QOS policy"."""
    if any(s in stderr for s in CONTROLLER_ERRORS):
        return "controller"
    if any(s in stderr for s in QUOTA_ERRORS):
        return "quota"
    if any(s.lower() in stderr.lower() for s in PERMANENT_SUBMIT_ERRORS):
        return "rejected"
    return "other"


def slurm_message(stderr: str) -> str:
    """Slurm's own words from a command's stderr, one line, without the ``sbatch: error:``
    prefixes (for ``runtime_status.error``)."""
    parts = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line:
            continue
        line = re.sub(r"^(sbatch|squeue|scancel|scontrol|sinfo|sacct): (error: )?", "", line)
        line = re.sub(r"^Batch job submission failed: ", "", line)
        if line and line not in parts:
            parts.append(line)
    return "; ".join(parts)


# --- human-readable scheduling status ---------------------------------------------------------

_REASONS: dict[str, str] = {
    "Resources": "waiting for resources in partition {p}",
    "Priority": "waiting for higher priority jobs in partition {p}",
    "None": "waiting to be scheduled in partition {p}",
    "": "waiting to be scheduled in partition {p}",
    "JobHeldUser": "held (scontrol release to start it)",
    "JobHeldAdmin": "held by a Slurm administrator",
    "PartitionDown": "waiting: partition {p} is down",
    "PartitionInactive": "waiting: partition {p} is inactive",
    "PartitionConfig": "cannot start: the request exceeds the limits of partition {p}",
    "PartitionNodeLimit": "cannot start: the request exceeds the node limit of partition {p}",
    "PartitionTimeLimit": "cannot start: the time limit exceeds the limit of partition {p}",
    "BadConstraints": "cannot start: no node in partition {p} satisfies the constraints",
    "BeginTime": "waiting for its begin time",
    "Dependency": "waiting for dependencies",
    "ReqNodeNotAvail": "waiting: required nodes are not available",
    "NodeDown": "waiting: a required node is down",
    "Reservation": "waiting for a reservation",
    "Licenses": "waiting for licenses",
    "launch failed requeued held": "held after a failed launch",
}


def scheduling_status(reason: str, partition: str) -> str:
    """Turn a Slurm pending reason into the text for ``runtime_status.scheduling_status``.

    Unknown reasons (QOS and association limits, site-specific ones) are passed through so that
    the user still sees Slurm's word for it.
    """
    p = partition or "(default)"
    key = reason.split(",", 1)[0].strip()
    template = _REASONS.get(key)
    if template is None and reason.startswith("launch failed"):
        template = _REASONS["launch failed requeued held"]
    if template is None and reason.startswith("Nodes required for job are DOWN"):
        # Slurm's long form of "the fitting nodes are busy with higher priority work".
        template = _REASONS["Resources"]
    if template is not None:
        return template.format(p=p)
    if key.startswith(("QOS", "Assoc", "MaxJob", "MaxCpu", "MaxMem", "MaxNode", "MaxGRES")):
        return f"waiting: limit {key} reached (partition {p})"
    return f"waiting in partition {p}: {reason}"


#: ``sacct --parsable2`` fields read by :func:`parse_sacct`, in this order.
SACCT_FORMAT = "JobIDRaw,State,ExitCode,Reason"


def parse_sacct(text: str, name: str) -> SqueueRow | None:
    """The newest job in ``sacct --noheader --parsable2 --allocations --format=SACCT_FORMAT``
    output, as a row :func:`end_description` can describe; ``None`` if there is none.

    sacct writes "CANCELLED by <uid>" for a cancelled job: the state is its first word.
    """
    best: SqueueRow | None = None
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0] or not parts[1]:
            continue
        job_id, state = parts[0], parts[1].split()[0]
        reason = parts[3].strip() if len(parts) > 3 else ""
        row = SqueueRow(job_id, 0, 0, _SHORT_STATES.get(state, state), "", name, reason)
        if best is None or _job_id_key(job_id) > _job_id_key(best.job_id):
            best = row
    return best


def end_description(row: SqueueRow) -> str:
    """How a job that Slurm still lists as ended finished, in words for ``runtime_status``."""
    what = {
        "BOOT_FAIL": "its node failed to boot",
        "DEADLINE": "it reached its deadline",
        "NODE_FAIL": "its node failed",
        "OUT_OF_MEMORY": "it ran out of memory",
        "PREEMPTED": "it was preempted",
        "TIMEOUT": "it reached its time limit",
        "CANCELLED": "it was cancelled",
        "FAILED": "it failed",
        "COMPLETED": "it completed",
    }.get(row.state, row.state.lower())
    detail = f", reason {row.reason}" if row.reason and row.reason != "None" else ""
    return f"Slurm job {row.job_id} ended: {what} ({row.state}{detail})"
