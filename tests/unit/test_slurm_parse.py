"""Slurm output parsers, tested on output captured from the real Slurm 22.05.8 dev cluster
(contrib/slurm/dev-cluster.sh) with the dispatcher's own squeue format."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dispatcher.slurm import parse

# `squeue --all --noheader --states=all --format='%i %y %Q %T %P %j %r'`, captured. Jobs 4-6 are
# sbatch submissions Slurm *rejected* ("Requested node configuration is not available"): they
# still show up as FAILED/BadConstraints. Job 14 was created by an sbatch that reported
# "Socket timed out on send/recv operation" while slurmctld was stopped (SIGSTOP).
CAPTURED_SQUEUE = """\
1 10000 9990000 FAILED compute zzzzz-dz642-aaaaaaaaaaaaaaa JobLaunchFailure
2 10000 9990000 CANCELLED parked zzzzz-dz642-bbbbbbbbbbbbbbb PartitionDown
3 5 0 PENDING compute zzzzz-dz642-ccccccccccccccc JobHeldUser
4 0 10000000 FAILED compute x BadConstraints
5 0 10000000 FAILED compute x BadConstraints
6 0 10000000 FAILED compute x BadConstraints
8 0 10000000 PENDING compute x PartitionConfig
9 0 10000000 COMPLETED big x None
10 0 10000000 PENDING parked name with space PartitionDown
11 5 9999995 FAILED compute zzzzz-dz642-eeeeeeeeeeeeeee NonZeroExitCode
12 0 10000000 COMPLETED compute zzzzz-dz642-fffffffffffffff None
13 0 10000000 COMPLETED compute zzzzz-dz642-ggggggggggggggg None
14 0 10000000 COMPLETED compute sbatch None
15 0 10000000 RUNNING compute fill1 None
16 0 10000000 RUNNING compute fill2 None
17 0 10000000 RUNNING compute fill3 None
18 0 10000000 RUNNING compute fill4 None
19 10000 9990000 RUNNING big zzzzz-dz642-hhhhhhhhhhhhhhh None
20 10000 9990000 PENDING compute zzzzz-dz642-iiiiiiiiiiiiiii Resources
21 10000 9990000 RUNNING compute zzzzz-dz642-jjjjjjjjjjjjjjj None
22 10000 9990000 RUNNING compute zzzzz-dz642-kkkkkkkkkkkkkkk None
23 10000 9990000 PENDING big,compute zzzzz-dz642-lllllllllllllll BeginTime
24 20000 9980000 PENDING compute zzzzz-dz642-mmmmmmmmmmmmmmm Priority
25 20000 9980000 PENDING big zzzzz-dz642-nnnnnnnnnnnnnnn Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions
"""

# Captured stderr of rejected / failed commands.
SBATCH_BAD_PARTITION = (
    "sbatch: error: invalid partition specified: nope\n"
    "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
)
SBATCH_BAD_MEMORY = (
    "sbatch: error: Memory specification can not be satisfied\n"
    "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
)
SBATCH_BAD_TMP = (
    "sbatch: error: Temporary disk specification can not be satisfied\n"
    "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
)
SBATCH_TOO_MANY_GPUS = (
    "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
)
SBATCH_BAD_GRES = "sbatch: error: Invalid generic resource (gres) specification\n"
SBATCH_BAD_FEATURE = "sbatch: error: Batch job submission failed: Invalid feature specification\n"
SBATCH_CTLD_HUNG = (
    "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n"
)
SBATCH_CTLD_DOWN = (
    "sbatch: error: Batch job submission failed: Unable to contact slurm controller "
    "(connect failure)\n"
)
SQUEUE_CTLD_HUNG = "slurm_load_jobs error: Socket timed out on send/recv operation\n"
SQUEUE_CTLD_DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"
SCONTROL_NO_JOB = "scontrol: error: No jobs with name 'zzzzz-dz642-nonexistentxxxx'\n"
SBATCH_OK = "Submitted batch job 19\n"


def test_parse_captured_squeue_every_line() -> None:
    rows, bad = parse.parse_squeue(CAPTURED_SQUEUE)
    assert bad == []
    assert len(rows) == 24
    r = rows[0]
    assert (r.job_id, r.nice, r.priority, r.state, r.partition, r.name, r.reason) == (
        "1", 10000, 9990000, "FAILED", "compute", "zzzzz-dz642-aaaaaaaaaaaaaaa", "JobLaunchFailure"
    )
    assert r.ended and not r.pending
    last = rows[-1]
    assert last.reason.startswith("Nodes required for job are DOWN, DRAINED")
    assert last.pending and not last.ended
    multi = next(r for r in rows if r.job_id == "23")
    assert multi.partition == "big,compute" and multi.reason == "BeginTime"


def test_name_with_blanks_is_missplit_but_harmless() -> None:
    rows, _ = parse.parse_squeue(CAPTURED_SQUEUE)
    row = next(r for r in rows if r.job_id == "10")
    # "name with space": only UUID-shaped names matter, and this one cannot look like one.
    assert row.name == "name"


def test_current_jobs_separates_live_and_ended() -> None:
    rows, _ = parse.parse_squeue(CAPTURED_SQUEUE)
    live, ended = parse.current_jobs(rows)
    assert "zzzzz-dz642-iiiiiiiiiiiiiii" in live
    assert "zzzzz-dz642-ccccccccccccccc" in live  # held: still present
    assert "zzzzz-dz642-aaaaaaaaaaaaaaa" not in live
    assert ended["zzzzz-dz642-eeeeeeeeeeeeeee"].state == "FAILED"
    # The rejected submissions named "x" ended, but job 8 named "x" is live: x is present.
    assert live["x"].job_id == "8"
    assert "x" not in ended


def test_current_jobs_prefers_highest_live_job_id() -> None:
    text = (
        "7 10000 5 PENDING compute zzzzz-dz642-aaaaaaaaaaaaaaa Priority\n"
        "100 10000 5 RUNNING compute zzzzz-dz642-aaaaaaaaaaaaaaa None\n"
        "99 0 5 TIMEOUT compute zzzzz-dz642-aaaaaaaaaaaaaaa TimeLimit\n"
        "9 0 5 NODE_FAIL compute zzzzz-dz642-bbbbbbbbbbbbbbb None\n"
        "12 0 5 COMPLETED compute zzzzz-dz642-bbbbbbbbbbbbbbb None\n"
    )
    rows, _ = parse.parse_squeue(text)
    live, ended = parse.current_jobs(rows)
    assert live["zzzzz-dz642-aaaaaaaaaaaaaaa"].job_id == "100"
    assert ended == {"zzzzz-dz642-bbbbbbbbbbbbbbb": rows[-1]}
    assert parse.duplicate_live_jobs(rows) == {"zzzzz-dz642-aaaaaaaaaaaaaaa": ["7", "100"]}


def test_unparsed_lines_are_reported_not_guessed() -> None:
    text = (
        "garbage\n"
        "\n"
        "1 N/A 5 PENDING compute zzzzz-dz642-aaaaaaaaaaaaaaa None\n"
        "2 0 5 PENDING compute\n"
        "3 0 5 R compute zzzzz-dz642-ccccccccccccccc\n"
    )
    rows, bad = parse.parse_squeue(text)
    assert [r.job_id for r in rows] == ["3"]
    assert rows[0].state == "RUNNING"  # compact code normalised
    assert rows[0].reason == ""
    assert len(bad) == 3


@given(st.text())
def test_parse_squeue_never_raises(text: str) -> None:
    rows, bad = parse.parse_squeue(text)
    assert len(rows) + len(bad) == len([ln for ln in text.splitlines() if ln.strip()])


def test_sbatch_job_id() -> None:
    assert parse.parse_sbatch_job_id(SBATCH_OK) == "19"
    assert parse.parse_sbatch_job_id("42;crunchgate\n") == "42"
    assert parse.parse_sbatch_job_id("something else\n") is None


def test_error_kinds_on_captured_stderr() -> None:
    for text in (SBATCH_BAD_PARTITION, SBATCH_BAD_MEMORY, SBATCH_BAD_TMP, SBATCH_TOO_MANY_GPUS,
                 SBATCH_BAD_GRES, SBATCH_BAD_FEATURE):
        assert parse.error_kind(text) == "rejected", text
    for text in (SBATCH_CTLD_HUNG, SBATCH_CTLD_DOWN, SQUEUE_CTLD_HUNG, SQUEUE_CTLD_DOWN,
                 "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying\n"):
        assert parse.error_kind(text) == "controller", text
    assert parse.error_kind(
        "sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission "
        "failed: Job violates accounting/QOS policy (job submit limit, user's size and/or time "
        "limits)\n"
    ) == "quota"
    assert parse.error_kind(SCONTROL_NO_JOB) == "other"


def test_slurm_message_quotes_slurm() -> None:
    assert parse.slurm_message(SBATCH_BAD_MEMORY) == (
        "Memory specification can not be satisfied; "
        "Requested node configuration is not available"
    )
    assert parse.slurm_message(SBATCH_BAD_PARTITION) == (
        "invalid partition specified: nope; Invalid partition name specified"
    )


def test_scheduling_status_words() -> None:
    rows, _ = parse.parse_squeue(CAPTURED_SQUEUE)
    by_id = {r.job_id: r for r in rows}

    def status(job_id: str) -> str:
        return parse.scheduling_status(by_id[job_id].reason, by_id[job_id].partition)

    assert status("20") == "waiting for resources in partition compute"
    assert status("24") == "waiting for higher priority jobs in partition compute"
    assert status("25") == "waiting for resources in partition big"
    assert status("23") == "waiting for its begin time"
    assert status("3").startswith("held")
    assert status("8").startswith("cannot start: the request exceeds the limits of partition")
    assert status("2") == "waiting: partition parked is down"
    assert parse.scheduling_status("QOSMaxJobsPerUserLimit", "compute") == (
        "waiting: limit QOSMaxJobsPerUserLimit reached (partition compute)"
    )
    assert parse.scheduling_status("SomethingNew", "big") == "waiting in partition big: SomethingNew"


def test_end_description() -> None:
    row = parse.SqueueRow("7", 0, 1, "NODE_FAIL", "compute", "zzzzz-dz642-aaaaaaaaaaaaaaa", "None")
    assert parse.end_description(row) == "Slurm job 7 ended: its node failed (NODE_FAIL)"
    row = parse.SqueueRow("8", 0, 1, "TIMEOUT", "big", "n", "TimeLimit")
    assert "reached its time limit (TIMEOUT, reason TimeLimit)" in parse.end_description(row)
    assert "OUT_OF_MEMORY" in parse.BAD_END_STATES and "COMPLETED" not in parse.BAD_END_STATES


# --- sacct -------------------------------------------------------------------------------------

SACCT_NAME = "zzzzz-dz642-0123456789abcde"


def test_parse_sacct_takes_the_newest_job_and_its_end() -> None:
    text = ("17|CANCELLED by 0|0:15|None\n"
            "garbage without fields\n"
            "\n"
            "9|COMPLETED|0:0|None\n"
            "23|NODE_FAIL|0:0|None\n")
    row = parse.parse_sacct(text, SACCT_NAME)
    assert row is not None and row.job_id == "23" and row.state == "NODE_FAIL" and row.ended
    assert parse.end_description(row) == "Slurm job 23 ended: its node failed (NODE_FAIL)"


def test_parse_sacct_cancelled_by_uid_and_reasons() -> None:
    row = parse.parse_sacct("41|CANCELLED by 1000|0:15|Prolog\n", SACCT_NAME)
    assert row is not None and row.state == "CANCELLED"
    assert parse.end_description(row) == \
        "Slurm job 41 ended: it was cancelled (CANCELLED, reason Prolog)"


def test_parse_sacct_nothing_known() -> None:
    assert parse.parse_sacct("", SACCT_NAME) is None
    assert parse.parse_sacct("|||\n", SACCT_NAME) is None
    row = parse.parse_sacct("5|RUNNING|0:0|None\n", SACCT_NAME)
    assert row is not None and not row.ended


@given(st.text())
def test_parse_sacct_never_raises(text: str) -> None:
    parse.parse_sacct(text, SACCT_NAME)
