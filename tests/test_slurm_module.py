"""oel_hpc/slurm.py without a cluster: the state table, job ids and array specs, the squeue/sacct parsers on the
formats Slurm prints, node lists, and the command runner's retry rule; then the launcher's submit() and the
dashboard's query through it.

Slurm's commands are stood in for by small shell scripts put first on PATH (`fake()`): each records how it was
called and answers as Slurm would (a job id, a table, or an error on stderr with a non-zero exit status). The
real cluster tests are tests/test_slurm_launch.py and friends (they need SLURM_CONF).
"""
import os
import re
from pathlib import Path

import pytest

from oel_hpc import slurm, status
from oel_hpc.errors import SlurmError
from oel_hpc.launch.slurm import submit
from oel_hpc.pipeline import build_dag
from oel_hpc.rundir import RunPaths
from oel_hpc.slurm import FINAL, PENDING, RUNNING, Runner, Slurm
from tests.conftest import compose

# Slurm's JOB STATE CODES, as squeue(1) lists them (sacct(1) shows a subset), and the phase each is in
DOCUMENTED = {
    "BOOT_FAIL": FINAL, "CANCELLED": FINAL, "COMPLETED": FINAL, "CONFIGURING": RUNNING, "COMPLETING": RUNNING,
    "DEADLINE": FINAL, "FAILED": FINAL, "NODE_FAIL": FINAL, "OUT_OF_MEMORY": FINAL, "PENDING": PENDING,
    "PREEMPTED": FINAL, "RUNNING": RUNNING, "RESV_DEL_HOLD": PENDING, "REQUEUE_FED": PENDING,
    "REQUEUE_HOLD": PENDING, "REQUEUED": PENDING, "RESIZING": RUNNING, "REVOKED": FINAL, "SIGNALING": RUNNING,
    "SPECIAL_EXIT": FINAL, "STAGE_OUT": RUNNING, "STOPPED": RUNNING, "SUSPENDED": RUNNING, "TIMEOUT": FINAL,
}


def test_one_state_table_covers_every_documented_state():
    assert len(DOCUMENTED) == 24
    assert {s: slurm.phase(s) for s in DOCUMENTED} == DOCUMENTED
    assert set(slurm.JOB_STATES) == set(DOCUMENTED)
    assert slurm.phase("CANCELLED by 1000") == FINAL  # how sacct writes a cancelled job
    assert slurm.phase("SOMETHING_NEW") is None and slurm.phase(None) is None and slurm.phase("") is None
    # the two states the launcher's and the dashboard's tables disagreed on
    assert slurm.in_queue("COMPLETING") and slurm.in_queue("RESV_DEL_HOLD")
    assert not slurm.in_queue("COMPLETED") and not slurm.in_queue("SPECIAL_EXIT")
    assert slurm.never_starts({"state": "PENDING", "reason": "DependencyNeverSatisfied"})
    assert not slurm.never_starts({"state": "PENDING", "reason": "Dependency"})
    assert not slurm.never_starts({"state": "RUNNING", "reason": "DependencyNeverSatisfied"})


def test_job_ids_and_array_specs():
    assert slurm.array_spec([0, 1, 2, 3]) == "0-3"
    assert slurm.array_spec([5, 0, 2]) == "0,2,5"
    assert slurm.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert slurm.array_spec(list(range(0, 101, 2))) == ",".join(str(i) for i in range(0, 101, 2))
    assert slurm.expand_indices("0,2-4%2") == [0, 2, 3, 4]
    assert slurm.expand_indices("1-7:3") == [1, 4, 7]
    for tasks in ([0], [3, 4, 9], [0, 1, 2, 5, 7, 8], list(range(0, 30, 3))):
        assert slurm.expand_indices(slurm.array_spec(tasks)) == tasks  # what we write, we read back
    assert slurm.parse_job_id("123") == ("123", None)
    assert slurm.parse_job_id("123_5") == ("123", {5})
    assert slurm.parse_job_id("123_[4-9%2]") == ("123", {4, 5, 6, 7, 8, 9})
    assert slurm.parse_job_id(" 123_[2,7] ") == ("123", {2, 7})
    assert slurm.parse_job_id("local") is None and slurm.parse_job_id("123.batch") is None
    assert slurm.job_ref("123") == "123" and slurm.job_ref("123", 4) == "123_4"
    assert slurm.job_ref("123", 0) == "123_0"  # task 0 is a task
    assert slurm.current_job({}) is None
    assert slurm.current_job({"SLURM_JOB_ID": "812"}) == "812"
    assert slurm.current_job({"SLURM_JOB_ID": "815", "SLURM_ARRAY_JOB_ID": "812", "SLURM_ARRAY_TASK_ID": "3"}) \
        == "812_3"
    assert [slurm.seconds_of(t) for t in ("0:05", "1:02:03", "2-00:00:01", "00:00:00", "", None)] == [
        5, 3723, 172801, 0, None, None]


def test_squeue_rows():
    out = "\n".join([
        "123_[4-9%2]|PENDING|0:00|(JobArrayTaskLimit)|",  # a throttled pending array, compressed
        "123_3|RUNNING|1:02|gpu01|gpu01",
        "812|PENDING|0:00|(BeginTime)|",  # a requeued job waits out its BeginTime
        "813|REQUEUE_HOLD|0:00|(JobHeldAdmin)|",
        "40|PENDING|0:00|(DependencyNeverSatisfied)|",
        "41|COMPLETING|1-02:00:07|gpu[01-02]|gpu[01-02]",
        "42|PENDING|0:00|(None)|",
        "not a row",
    ])
    rows = slurm.parse_squeue(out)
    assert sorted(k for k in rows if k[0] == "123") == [("123", t) for t in range(3, 10)]
    # old-format lines (five fields): no time left, no expected start
    assert rows[("123", 7)] == {"state": "PENDING", "reason": "JobArrayTaskLimit", "elapsed_s": 0, "node": None,
                                "time_left_s": None, "expected_start": None}
    assert rows[("123", 3)] == {"state": "RUNNING", "reason": None, "elapsed_s": 62, "node": "gpu01",
                                "time_left_s": None, "expected_start": None}
    assert rows[("812", None)]["state"] == "PENDING" and rows[("812", None)]["reason"] == "BeginTime"
    assert rows[("813", None)]["state"] == "REQUEUE_HOLD"
    assert slurm.never_starts(rows[("40", None)])
    assert rows[("41", None)] == {"state": "COMPLETING", "reason": None, "elapsed_s": 93607, "node": "gpu[01-02]",
                                  "time_left_s": None, "expected_start": None}
    assert rows[("42", None)]["reason"] is None
    assert len(rows) == 12


def test_sacct_rows():
    out = "\n".join([
        "123_[4-9%2]|oel:r:r1:extract|PENDING|00:00:00|0:0|None assigned|Unknown|Unknown",
        "123_3|oel:r:r1:extract|RUNNING|00:01:02|0:0|gpu01|2026-01-01T00:00:00|Unknown",
        "123_2|oel:r:r1:extract|CANCELLED by 1000|00:00:00|0:0|None assigned|Unknown|2026-01-01T00:00:03",
        "123_1|oel:r:r1:extract|FAILED|00:00:02|3:0|gpu02|2026-01-01T00:00:00|2026-01-01T00:00:02",
        # a requeued job with --duplicates: the preempted attempt first, the newest last
        "812|oel:r:r1:consolidate|REQUEUED|00:05:00|0:0|gpu03|2026-01-01T01:00:00|2026-01-01T01:05:00",
        "812|oel:r:r1:consolidate|RUNNING|00:00:10|0:0|gpu04|2026-01-01T01:06:00|Unknown",
        "short|row",
    ])
    rows = slurm.parse_sacct(out)
    assert sorted(k for k in rows if k[0] == "123") == [("123", t) for t in range(1, 10)]
    assert rows[("123", 5)]["state"] == "PENDING" and rows[("123", 5)]["node"] is None
    assert rows[("123", 5)]["start"] is None and rows[("123", 5)]["end"] is None
    assert rows[("123", 3)] == {"state": "RUNNING", "reason": None, "elapsed_s": 62, "exit_code": "0:0",
                                "node": "gpu01", "name": "oel:r:r1:extract", "start": "2026-01-01T00:00:00",
                                "end": None, "restarts": 0, "submit": None}
    assert rows[("123", 2)]["state"] == "CANCELLED"
    assert (rows[("123", 1)]["state"], rows[("123", 1)]["exit_code"]) == ("FAILED", "3:0")
    assert (rows[("812", None)]["state"], rows[("812", None)]["node"]) == ("RUNNING", "gpu04")


def test_hostnames():
    assert slurm.hostnames("gpu01") == ["gpu01"]
    assert slurm.hostnames("gpu[01-03,7],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]
    assert slurm.hostnames("node[008-011]") == ["node008", "node009", "node010", "node011"]
    assert slurm.hostnames("rack[1-2]-n[01-02]") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]
    assert slurm.hostnames("a-[1,3]-ib,b") == ["a-1-ib", "a-3-ib", "b"]
    for bad in ("gpu[01-", "gpu[a-b]", "gpu]1["):
        with pytest.raises(SlurmError, match="node list"):
            slurm.hostnames(bad)


# ---------------------------------------------------------------------------------------------------------------
# The runner, with stand-ins for Slurm's commands on PATH

@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    return folder


def fake(bin_dir: Path, name: str, body: str) -> Path:
    """A stand-in for the Slurm command `name`: a bash script; `$CALLS` counts its runs (1 on the first), and every
    run appends its arguments to <name>.calls."""
    calls = bin_dir / f"{name}.calls"
    script = bin_dir / name
    script.write_text(f'#!/bin/bash\nprintf "%s\\n" "$*" >> "{calls}"\nCALLS=$(wc -l < "{calls}")\n{body}\n')
    script.chmod(0o755)
    return calls


def calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def quick(**kw) -> Runner:
    """A runner that records its waits instead of sleeping."""
    waits = []
    runner = Runner(sleep=waits.append, **kw)
    runner.waits = waits
    return runner


def test_a_transient_query_failure_is_retried(bin_dir, caplog):
    log = fake(bin_dir, "squeue", """
if [ "$CALLS" -le 2 ]; then
  echo "slurm_load_jobs error: Socket timed out on send/recv operation" >&2; exit 1
fi
echo "77|RUNNING|0:05|gpu01|gpu01"
""")
    runner = quick()
    assert Slurm(runner).queue(["77"]) == {("77", None): {"state": "RUNNING", "reason": None, "elapsed_s": 5,
                                                          "node": "gpu01", "time_left_s": None,
                                                          "expected_start": None}}
    assert len(calls(log)) == 3 and runner.waits == list(slurm.BACKOFF_S)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and all("Socket timed out" in w for w in warned) and "attempt 3 of 3" in warned[1]


def test_a_query_that_keeps_failing_gives_up(bin_dir):
    log = fake(bin_dir, "sacct", 'echo "sacct: error: Unable to contact slurm controller (connect failure)" >&2; exit 1')
    with pytest.raises(SlurmError, match=r"sacct failed \(after 3 attempts\): .*connect failure"):
        Slurm(quick()).accounting(["77"])
    assert len(calls(log)) == 3


def test_a_permanent_failure_is_not_retried(bin_dir):
    log = fake(bin_dir, "sacct", 'echo "sacct: error: Invalid field requested: \\"Bogus\\"" >&2; exit 1')
    runner = quick()
    with pytest.raises(SlurmError, match="^sacct failed: sacct: error: Invalid field requested"):
        Slurm(runner).accounting(["77"])
    assert len(calls(log)) == 1 and runner.waits == []


def test_a_query_timeout_is_retried(bin_dir):
    log = fake(bin_dir, "squeue", '[ "$CALLS" -eq 1 ] && sleep 5\necho "78|PENDING|0:00|(Priority)|"')
    rows = Slurm(quick(timeout_s=0.5)).queue(["78"])
    assert rows[("78", None)]["reason"] == "Priority" and len(calls(log)) == 2


def test_squeue_knowing_none_of_the_jobs_is_an_empty_queue(bin_dir):
    fake(bin_dir, "squeue", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    assert Slurm(quick()).queue(["5", "6"]) == {}


def test_a_missing_command_says_where_to_run(bin_dir, monkeypatch):
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(SlurmError, match="^squeue not found: run this on a Slurm login node"):
        Slurm(quick()).queue(["5"])


def test_sbatch_arguments_and_answer(bin_dir, tmp_path):
    log = fake(bin_dir, "sbatch", 'echo "4242;cluster1"')
    client = Slurm(quick())
    script = tmp_path / "r1_extract.sbatch"
    assert client.sbatch(script, array="0-2,5", dependency=["40", "41_3"]) == "4242"
    assert client.sbatch(script) == "4242"
    assert calls(log) == [f"--parsable --array=0-2,5 --dependency=afterok:40:41_3 {script}", f"--parsable {script}"]
    assert client.sbatch_calls[0] == ["sbatch", "--parsable", "--array=0-2,5", "--dependency=afterok:40:41_3",
                                      str(script)]
    fake(bin_dir, "sbatch", 'echo "Submitted batch job 4242"')  # not --parsable's answer
    with pytest.raises(SlurmError, match="not a job id"):
        client.sbatch(script)


def test_sbatch_refused_by_slurm_is_retried_once_accepted_submits_once(bin_dir, tmp_path):
    jobs = tmp_path / "queued"
    log = fake(bin_dir, "sbatch", f"""
if [ "$CALLS" -le 2 ]; then
  echo "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)" >&2; exit 1
fi
echo job >> "{jobs}"; echo 4243
""")
    runner = quick()
    assert Slurm(runner).sbatch(tmp_path / "r1_gather.sbatch") == "4243"
    assert len(calls(log)) == 3 and calls(jobs) == ["job"] and len(runner.waits) == 2


@pytest.mark.parametrize("answer", ["sbatch: error: Batch job submission failed: Socket timed out on send/recv "
                                    "operation", "TIMEOUT"])
def test_sbatch_whose_outcome_is_unknown_is_not_sent_again(bin_dir, tmp_path, answer):
    """Slurm got the job (it is queued) but its answer is lost: sending sbatch again would queue it twice."""
    jobs = tmp_path / "queued"
    lost = "sleep 5" if answer == "TIMEOUT" else f'echo "{answer}" >&2; exit 1'
    log = fake(bin_dir, "sbatch", f'echo job >> "{jobs}"\n{lost}')
    with pytest.raises(SlurmError, match="may have carried it out, so it was not repeated"):
        Slurm(quick(timeout_s=0.5)).sbatch(tmp_path / "r1_gather.sbatch")
    assert len(calls(log)) == 1 and calls(jobs) == ["job"]


def test_requeue_and_cancel_are_not_repeated_on_an_unknown_outcome(bin_dir):
    log = fake(bin_dir, "scontrol", 'echo "slurm_requeue error: Socket timed out on send/recv operation" >&2; exit 1')
    with pytest.raises(SlurmError, match="not repeated"):
        Slurm(quick()).requeue("812_3")
    assert calls(log) == ["requeue 812_3"]
    log = fake(bin_dir, "scancel", 'echo "scancel: error: Zero Bytes were transmitted or received" >&2; exit 1')
    with pytest.raises(SlurmError, match="not repeated"):
        Slurm(quick()).cancel(["5", "6_1"])
    assert calls(log) == ["5 6_1"]


# ---------------------------------------------------------------------------------------------------------------
# The launcher and the dashboard through it

SQUEUE = 'cat "{queue}" 2>/dev/null; true'  # the queue the test writes: squeue rows, one per line


@pytest.fixture
def cluster(bin_dir, tmp_path):
    """Stand-ins for sbatch (ids from 100 on), squeue (prints <tmp>/queue) and scancel."""
    queue = tmp_path / "queue"
    logs = {"sbatch": fake(bin_dir, "sbatch", "echo $((99 + CALLS))"),
            "squeue": fake(bin_dir, "squeue", SQUEUE.format(queue=queue)),
            "scancel": fake(bin_dir, "scancel", "true")}
    return {"bin": bin_dir, "queue": queue, **logs}


def launch(tmp_path, client=None):
    cfg = compose(["cluster=local_slurm", f"run.root={tmp_path / 'runs'}", "wandb.mode=disabled"])
    nodes = build_dag(cfg)
    paths = RunPaths(tmp_path / "runs" / cfg.run.name)
    return submit(cfg, paths, nodes, "run-hash", client or Slurm(quick())), nodes


def dependencies(sbatch_line: str) -> list[str]:
    m = re.search(r"--dependency=afterok:(\S+)", sbatch_line)
    return m.group(1).split(":") if m else []


def test_submit_chains_the_dag_and_a_second_call_keeps_what_is_queued(tmp_path, cluster):
    report, nodes = launch(tmp_path)
    ids = {s.node.id: s.job_id for s in report.submitted}
    assert [s.node.id for s in report.submitted] == [n.id for n in nodes]
    lines = calls(cluster["sbatch"])
    assert len(lines) == len(nodes) and list(ids.values()) == [str(100 + i) for i in range(len(nodes))]
    for n, line in zip(nodes, lines):
        assert line.endswith(f"r{n.round}_{n.stage}.sbatch")
        assert dependencies(line) == [ids[d] for d in n.deps], (n.id, line)
        if n.tasks is not None:
            assert f"--array={slurm.array_spec(n.tasks)} " in line
        else:
            assert "--array" not in line

    # everything queued or running (COMPLETING included: it may still write its DONE marker): nothing to submit
    extract = next(n for n in nodes if n.stage == "extract")
    rows = [f"{ids['r1/extract']}_{t}|COMPLETING|0:30|vm|vm" for t in extract.tasks]
    rows += [f"{ids[n.id]}{'' if n.tasks is None else f'_[{slurm.array_spec(n.tasks)}]'}|PENDING|0:00|(Dependency)|"
             for n in nodes if n.id != "r1/extract"]  # a pending array: compressed, as squeue shows it
    cluster["queue"].write_text("\n".join(rows) + "\n")
    report, _ = launch(tmp_path)
    assert report.submitted == [] and len(calls(cluster["sbatch"])) == len(nodes)
    assert report.in_flight["r1/extract"] == [f"{ids['r1/extract']}_{t}" for t in extract.tasks]

    # one extraction task failed, so the gather waiting on it never starts: it and what waits on it go again
    rows[0] = rows[0].replace("COMPLETING", "FAILED")
    gather = rows.index(f"{ids['r1/gather']}|PENDING|0:00|(Dependency)|")
    rows[gather] = rows[gather].replace("(Dependency)", "(DependencyNeverSatisfied)")
    cluster["queue"].write_text("\n".join(rows) + "\n")
    report, _ = launch(tmp_path)
    again = [s.node.id for s in report.submitted]
    assert again[0] == "r1/extract" and report.submitted[0].tasks == [extract.tasks[0]]
    assert "--array=" + str(extract.tasks[0]) + " " in calls(cluster["sbatch"])[len(nodes)]
    downstream = {"r1/gather", "r1/consolidate", "r1/evaluate"}
    assert downstream <= set(again) and "r1/deploy" not in again  # deploy waits on nothing replaced
    cancelled = calls(cluster["scancel"])[0].split()
    evaluate = next(n for n in nodes if n.stage == "evaluate")
    assert sorted(cancelled) == sorted([ids["r1/gather"], ids["r1/consolidate"],
                                        *(f"{ids['r1/evaluate']}_{t}" for t in evaluate.tasks)])
    new_extract = report.submitted[0].job_id
    new_gather = next(s for s in report.submitted if s.node.id == "r1/gather")
    kept = [f"{ids['r1/extract']}_{t}" for t in extract.tasks[1:]]
    assert new_gather.dependency == [new_extract, *kept]


def test_a_failed_sbatch_cancels_what_this_call_submitted(tmp_path, cluster):
    fake(cluster["bin"], "sbatch", """
[ "$CALLS" -eq 3 ] && { echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2; exit 1; }
echo $((99 + CALLS))""")
    with pytest.raises(SlurmError, match="sbatch r1_.*Invalid partition name"):
        launch(tmp_path)
    assert len(calls(cluster["sbatch"])) == 3  # a refusal that another try would not change: not repeated
    assert calls(cluster["scancel"]) == ["100 101"]


def test_status_asks_squeue_and_sacct_side_by_side(bin_dir, monkeypatch):
    fake(bin_dir, "squeue", 'echo "5_[1-2]|PENDING|0:00|(Resources)|"')
    fake(bin_dir, "sacct", 'echo "sacct: error: Problem talking to the database: Connection refused" >&2; exit 1')
    monkeypatch.setattr(status, "SLURM", Slurm(quick(attempts=2)))
    sacct, squeue, problems = status.query_slurm(["5"])
    assert sacct == {} and sorted(squeue) == [("5", 1), ("5", 2)]
    assert problems == ["sacct failed (after 2 attempts): sacct: error: Problem talking to the database: "
                        "Connection refused"]
