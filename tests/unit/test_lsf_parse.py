"""Pure parsers of LSF output (dispatcher/lsf/parse.py), on captured output shapes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.lsf.parse import (
    BkillOutcome,
    LsfJob,
    LsfOutputError,
    bsub_rejection_is_permanent,
    is_empty_queue_message,
    parse_bjobs_json,
    parse_bkill,
    parse_bsub_job_id,
    pending_reason_text,
)
from tests.lsfsim.sim import format_json

UUID1 = "zzzzz-dz642-queuedcontainer"
UUID2 = "zzzzz-dz642-pendingcontainr"

# The layout real LSF 10.1 prints (two-space indent, no space after ':').
REAL = """{
  "COMMAND":"bjobs",
  "JOBS":2,
  "RECORDS":[
    {
      "JOBID":"4711",
      "STAT":"RUN",
      "JOB_NAME":"zzzzz-dz642-queuedcontainer",
      "PEND_REASON":""
    },
    {
      "JOBID":"4712",
      "STAT":"PEND",
      "JOB_NAME":"zzzzz-dz642-pendingcontainr",
      "PEND_REASON":"There are no suitable hosts for the job;"
    }
  ]
}
"""


def test_real_layout() -> None:
    jobs = parse_bjobs_json(REAL)
    assert jobs == {
        UUID1: LsfJob("4711", "RUN", UUID1, ""),
        UUID2: LsfJob("4712", "PEND", UUID2, "There are no suitable hosts for the job;"),
    }
    assert jobs[UUID2].pending and not jobs[UUID1].pending


def test_banners_and_warnings_before_the_json() -> None:
    text = ("LSF is processing your request. Please wait ...\n"
            "Warning: LSF_UNIT_FOR_LIMITS is MB {sic}\n" + REAL + "trailing noise\n")
    assert set(parse_bjobs_json(text)) == {UUID1, UUID2}


def test_empty_records() -> None:
    assert parse_bjobs_json('{"COMMAND":"bjobs","JOBS":0,"RECORDS":[]}') == {}
    assert parse_bjobs_json('{\n  "COMMAND":"bjobs",\n  "JOBS":0\n}\n') == {}


def test_no_unfinished_job_found_text_is_an_empty_queue() -> None:
    assert parse_bjobs_json("No unfinished job found\n") == {}


@pytest.mark.parametrize("stdout, stderr, empty", [
    ("", "No unfinished job found\n", True),
    ("", "No job found\n", True),
    ("No unfinished job found\n", "", True),
    ("", "", False),
    ("", "LSF is down. Please wait ...\nNo unfinished job found\n", False),
    ("", "No unfinished job found for user x\n", False),
    ('{"COMMAND":"bjobs","JOBS":0,"RECORDS":[]}', "No unfinished job found\n", False),
])
def test_empty_queue_message_of_a_failed_bjobs(stdout: str, stderr: str, empty: bool) -> None:
    # Only the bare message, with nothing else on either stream, means "no jobs".
    assert is_empty_queue_message(stdout, stderr) is empty


def test_jobs_count_mismatch_is_refused() -> None:
    # A truncated listing must not make jobs look gone.
    text = REAL.replace('"JOBS":2', '"JOBS":3')
    with pytest.raises(LsfOutputError, match="JOBS=3 but listed 2"):
        parse_bjobs_json(text)


@pytest.mark.parametrize("text", [
    "",
    "LSF is down. Please wait ...\n",
    "bjobs: The -json option must be used with the -o option.\n",
    '{"COMMAND":"bjobs","JOBS":1,"RECORDS":[{"JOBID":"1","STAT":"RUN"',  # cut off
    '["not", "an", "object"]\n',
    '{"COMMAND":"bjobs","JOBS":1,"RECORDS":{"JOBID":"1"}}',
    '{"COMMAND":"bjobs","JOBS":1,"RECORDS":[{"JOBID":"1","STAT":"RUN"}]}',  # no JOB_NAME
    '{"COMMAND":"bjobs","JOBS":"many","RECORDS":[]}',
])
def test_garbage_is_an_error_not_an_empty_queue(text: str) -> None:
    with pytest.raises(LsfOutputError):
        parse_bjobs_json(text)


def test_error_records_are_skipped() -> None:
    text = format_json([
        {"JOBID": "101", "STAT": "RUN", "JOB_NAME": UUID1, "PEND_REASON": ""},
        {"JOBID": "999", "ERROR": "Job <999> is not found"},
    ])
    assert list(parse_bjobs_json(text)) == [UUID1]


def test_duplicate_names_last_wins() -> None:
    text = format_json([
        {"JOBID": "101", "STAT": "EXIT", "JOB_NAME": UUID1, "PEND_REASON": ""},
        {"JOBID": "102", "STAT": "PEND", "JOB_NAME": UUID1, "PEND_REASON": "x;"},
    ])
    assert parse_bjobs_json(text)[UUID1].job_id == "102"


def test_unicode_and_numeric_jobid() -> None:
    text = json.dumps({"COMMAND": "bjobs", "JOBS": 1, "RECORDS": [
        {"JOBID": 7, "STAT": "PEND", "JOB_NAME": "jöb ☃", "PEND_REASON": "Über; 雪;"}]},
        ensure_ascii=False)
    assert parse_bjobs_json(text) == {"jöb ☃": LsfJob("7", "PEND", "jöb ☃", "Über; 雪;")}


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@given(st.lists(st.tuples(st.integers(1, 10**9), st.sampled_from(["PEND", "RUN", "PSUSP"]),
                          _text, _text), max_size=8, unique_by=lambda r: r[2]),
       st.lists(st.sampled_from(["LSF is processing your request. Please wait ...",
                                 "Warning: job <1> ...", ""]), max_size=3))
def test_roundtrip_through_lsf_layout(rows: list[tuple[int, str, str, str]],
                                      banners: list[str]) -> None:
    records = [{"JOBID": str(i), "STAT": s, "JOB_NAME": n, "PEND_REASON": r}
               for i, s, n, r in rows]
    text = "".join(b + "\n" for b in banners) + format_json(records)
    jobs = parse_bjobs_json(text)
    assert {n: (j.job_id, j.stat, j.pend_reason) for n, j in jobs.items()} == {
        n: (str(i), s, r) for i, s, n, r in rows}


def test_pending_reason_text() -> None:
    assert pending_reason_text("Not enough job slot(s): 2 hosts;") == \
        "Not enough job slot(s): 2 hosts"
    assert pending_reason_text(" New job is\n waiting for scheduling; ") == \
        "New job is waiting for scheduling"


# --- bsub ---------------------------------------------------------------------------------


@pytest.mark.parametrize("out,job_id", [
    ("Job <123> is submitted to queue <normal>.\n", "123"),
    ("Job <4567> is submitted to default queue <normal>.\n", "4567"),
    ("LSF is processing your request. Please wait ...\nJob <9> is submitted to queue <s q>.\n", "9"),
    ("Job not submitted.\n", None),
    ("", None),
    ("Job <abc> is submitted to queue <normal>.", None),
])
def test_bsub_job_id(out: str, job_id: str | None) -> None:
    assert parse_bsub_job_id(out) == job_id


@pytest.mark.parametrize("err,permanent", [
    ("Bad resource requirement syntax. Job not submitted.", True),
    ("nope: No such queue. Job not submitted.", True),
    ("foo: Unknown resource name. Job not submitted.", True),
    ("bsub: illegal option -- Z\nUsage: bsub [options] command [arguments]", True),
    ("Too many tasks requested. Job not submitted.", True),
    ("The GPU requirement string is not valid. Job not submitted.", True),
    ("LSF is down. Please wait ...\nBatch system not responding. Job not submitted.", False),
    ("Failed in an LSF library call: Slave LIM configuration is not ready yet. "
     "Job not submitted.", False),
    ("User <crunch>: Pending job threshold reached. Job not submitted.", False),
    ("sudo: unable to resolve host x", False),
    ("stub random failure", False),
])
def test_bsub_rejection_classification(err: str, permanent: bool) -> None:
    assert bsub_rejection_is_permanent(err) is permanent


# --- bkill --------------------------------------------------------------------------------


@pytest.mark.parametrize("rc,out,outcome", [
    (0, "Job <101> is being terminated\n", BkillOutcome.TERMINATING),
    (255, "Job <101>: Job has already finished\n", BkillOutcome.ALREADY_FINISHED),
    (0, "Job <101>: Job has already finished\n", BkillOutcome.ALREADY_FINISHED),
    (255, "Job <101>: No matching job found\n", BkillOutcome.NOT_FOUND),
    (255, "LSF is down. Please wait ...\n", BkillOutcome.FAILED),
    (1, "", BkillOutcome.FAILED),
])
def test_bkill(rc: int, out: str, outcome: BkillOutcome) -> None:
    assert parse_bkill(rc, out) is outcome
