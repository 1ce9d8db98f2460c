"""Pure parsers for LSF command output: ``bjobs -json``, ``bsub`` replies, ``bkill`` replies.

Text in, records out; no I/O. What real LSF prints (and what these functions accept):

* ``bjobs -u all -o "jobid stat job_name pend_reason" -json``::

      {
        "COMMAND":"bjobs",
        "JOBS":2,
        "RECORDS":[
          {
            "JOBID":"101",
            "STAT":"PEND",
            "JOB_NAME":"zzzzz-dz642-...",
            "PEND_REASON":"Not enough job slot(s): 2 hosts;"
          },
          ...
        ]
      }

  Site wrappers and LSF itself may print banners or warnings before the JSON ("LSF is
  processing your request. Please wait ..."); records for job ids that do not exist carry an
  ``ERROR`` field instead of the job fields. A ``JOBS`` count that disagrees with ``RECORDS``
  means truncated output and is refused: a partial listing would make jobs look gone.
* ``bsub``: ``Job <123> is submitted to queue <normal>.`` (or ``to default queue``); failures
  end with ``Job not submitted.`` on stderr.
* ``bkill 123``: ``Job <123> is being terminated``, ``Job <123>: Job has already finished``,
  ``Job <123>: No matching job found``.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

BJOBS_FIELDS = "jobid stat job_name pend_reason"


class LsfError(Exception):
    """Base class of the errors of ``dispatcher.lsf``."""


class LsfOutputError(LsfError):
    """An LSF command printed something we cannot parse; the message quotes a short excerpt."""


@dataclass(frozen=True)
class LsfJob:
    """One ``bjobs`` record."""

    job_id: str
    stat: str
    name: str
    pend_reason: str = ""

    @property
    def pending(self) -> bool:
        """Waiting to start (PEND, or suspended while pending)."""
        return self.stat in ("PEND", "PSUSP")


def _excerpt(text: str, limit: int = 200) -> str:
    text = text.strip()
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


_NO_JOBS_RE = re.compile(r"^No (unfinished )?job found\s*$", re.MULTILINE)


def parse_bjobs_json(text: str) -> dict[str, LsfJob]:
    """Parse ``bjobs ... -json`` stdout into ``{job name: LsfJob}``.

    Lines before the JSON object (banners, warnings) are skipped; anything after it is ignored.
    A plain ``No unfinished job found`` (some LSF versions print it instead of an empty JSON
    object) is an empty queue. For duplicate names the last record wins (as in the reference).
    Raises :class:`LsfOutputError` for anything else — never returns partial data.
    """
    start = _json_start(text)
    if start < 0:
        if _NO_JOBS_RE.search(text):
            return {}
        raise LsfOutputError(f"bjobs printed no JSON object: {_excerpt(text)}")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise LsfOutputError(
            f"bjobs printed invalid JSON ({exc.msg} at char {exc.pos - start}): "
            f"{_excerpt(text[start:])}"
        ) from None
    if not isinstance(obj, dict):
        raise LsfOutputError(f"bjobs JSON is not an object: {_excerpt(text[start:])}")
    records = obj.get("RECORDS")
    if records is None and obj.get("JOBS") in (0, "0"):
        records = []
    if not isinstance(records, list):
        raise LsfOutputError(f"bjobs JSON has no RECORDS list: {_excerpt(text[start:])}")
    count = obj.get("JOBS")
    if count is not None:
        try:
            n = int(count)
        except (TypeError, ValueError):
            raise LsfOutputError(f"bjobs JSON has a non-numeric JOBS count {count!r}") from None
        if n != len(records):
            raise LsfOutputError(
                f"bjobs reported JOBS={n} but listed {len(records)} records (truncated output?)"
            )
    jobs: dict[str, LsfJob] = {}
    for rec in records:
        if not isinstance(rec, dict):
            raise LsfOutputError(f"bjobs record is not an object: {_excerpt(repr(rec))}")
        if "ERROR" in rec and "JOB_NAME" not in rec:
            # "Job <123> is not found": only happens for explicit job ids; not a job.
            continue
        job_id, name = rec.get("JOBID"), rec.get("JOB_NAME")
        if job_id in (None, "") or not isinstance(name, str):
            raise LsfOutputError(
                f"bjobs record without JOBID/JOB_NAME: {_excerpt(json.dumps(rec))}; "
                f'run bjobs with -o "{BJOBS_FIELDS}"'
            )
        jobs[name] = LsfJob(
            job_id=str(job_id),
            stat=str(rec.get("STAT") or ""),
            name=name,
            pend_reason=str(rec.get("PEND_REASON") or ""),
        )
    return jobs


def is_empty_queue_message(stdout: str, stderr: str) -> bool:
    """True if a *failed* bjobs said nothing but "No unfinished job found" / "No job found".

    Depending on version and options, LSF reports an empty queue that way on stderr with a
    non-zero exit status instead of an empty JSON listing. Only that exact message (nothing
    else on either stream) counts: any other failure means "we do not know".
    """
    lines = [ln.strip() for ln in f"{stdout}\n{stderr}".splitlines() if ln.strip()]
    return bool(lines) and all(_NO_JOBS_RE.fullmatch(ln) for ln in lines)


def _json_start(text: str) -> int:
    """Offset of the ``{`` that opens the JSON document (first line that starts with one)."""
    if text.lstrip().startswith("{"):
        return text.index("{")
    m = re.search(r"^[ \t]*\{", text, re.MULTILINE)
    return text.index("{", m.start()) if m else -1


def pending_reason_text(reason: str) -> str:
    """LSF's pending reason as one tidy line: whitespace collapsed, trailing ``;`` dropped."""
    return re.sub(r"\s+", " ", reason).strip().rstrip(";").strip()


# --- bsub -----------------------------------------------------------------------------------

_SUBMITTED_RE = re.compile(r"Job <(\d+)> is submitted to (?:default )?queue <([^>]*)>")


def parse_bsub_job_id(stdout: str) -> str | None:
    """The job id from bsub's reply, or None when the reply has none (banners are skipped)."""
    m = _SUBMITTED_RE.search(stdout)
    return m.group(1) if m else None


# Rejections that will not go away by retrying the same submission: the arguments or the site
# configuration are wrong. Everything else (LSF down, mbatchd busy, timeouts, sudo hiccups,
# pending-job thresholds) is transient.
_PERMANENT_PATTERNS = [
    r"Bad resource requirement syntax",
    r"Unknown resource",
    r"No such queue",
    r"illegal option",
    r"Illegal option",
    r"Bad argument for option",
    r"option requires an argument",
    r"requirement string is not valid",
    r"Bad #BSUB",
    r"Too many (?:processors|tasks|slots) requested",
    r"exceeds? (?:the )?queue'?s? (?:\w+ )?limit",
    r"not a valid (?:user|queue|host|project|option)",
    r"Bad host name",
    r"User permission denied",
    r"is not authorized to submit",
    r"No command is specified",
]
_PERMANENT_RE = re.compile("|".join(_PERMANENT_PATTERNS), re.IGNORECASE)


def bsub_rejection_is_permanent(output: str) -> bool:
    """True if bsub's error ``output`` says the submission itself is wrong (retrying is useless)."""
    return bool(_PERMANENT_RE.search(output))


def lsf_message(output: str, limit: int = 500) -> str:
    """The meaningful part of an LSF error output: non-empty lines joined, trimmed."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    msg = "; ".join(lines)
    return msg if len(msg) <= limit else msg[:limit] + "..."


# --- bkill ----------------------------------------------------------------------------------


class BkillOutcome(enum.Enum):
    """What ``bkill <id>`` reported."""

    TERMINATING = "terminating"  # the signal was sent / the pending job removed
    ALREADY_FINISHED = "already finished"  # fine: nothing left to kill
    NOT_FOUND = "not found"  # LSF no longer knows the id (cleaned up): nothing left to kill
    FAILED = "failed"  # anything else: the job may still be there


def parse_bkill(returncode: int, output: str) -> BkillOutcome:
    """Classify bkill's exit code and combined stdout+stderr."""
    if "already finished" in output:
        return BkillOutcome.ALREADY_FINISHED
    if "No matching job found" in output:
        return BkillOutcome.NOT_FOUND
    if returncode == 0:
        return BkillOutcome.TERMINATING
    return BkillOutcome.FAILED
