"""The smoke workflow interrupted twice, then finished: its tables must be the uninterrupted run's.

In a fresh scratch copy: SIGKILL to Snakemake's process group (Snakemake and its running jobs, as an out-of-memory
kill or a lost machine would) while a model trains, past its resumable state; the lock the killed Snakemake leaves
makes the next run refuse until `snakemake --unlock`; then Ctrl-C (SIGINT to the group, as a terminal sends it)
while scores are computed; then a rerun to the end. Every csv table must equal the uninterrupted run's
(conftest's smoke_run) byte for byte, and the reruns may redo only the jobs that were running at a signal: no job
finishes twice, every output of a finished job keeps its modification time, and the killed training resumes from
its resumable state and writes the uninterrupted run's model file.

The signals are sent when the log and the files show the job in flight (polled every 10 ms), not after a fixed
sleep. Costs one more smoke run (conftest's smoke_run is the reference).
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from workflow_runs import copy_repo, snakemake, start_snakemake

pytestmark = pytest.mark.slow

SMOKE = ("--configfile", "configs/smoke.yaml")
TRAINING = ("train_full", "train_subset")
# A smoke model trains its 20 steps in about half a second; its resumable state (step 10) exists for the second half.
POLL = 0.01
TIMEOUT = 1800  # s for one interrupted run to reach its signal


@dataclass
class Run:
    """One Snakemake invocation as its log tells it: each job (rule, outputs) it started, with the job's log file,
    and the jobs it finished."""

    started: dict = field(default_factory=dict)
    finished: set = field(default_factory=set)
    total: int | None = None  # the job count of its plan

    def in_flight(self) -> list:
        return [job for job in self.started if job not in self.finished]


def read_log(text: str) -> Run:
    run, by_id, block = Run(), {}, None
    for line in text.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):$", line):  # a job starts: its block of indented fields follows
            block = {"rule": match.group(1), "output": "", "log": ""}
        elif block is not None and line.startswith("    "):
            key, _, value = line.strip().partition(": ")
            if key in ("output", "log"):
                block[key] = value
            elif key == "jobid":
                job = (block["rule"], block["output"])
                by_id[int(value)] = job
                run.started[job] = block["log"]
        else:
            block = None
            if match := re.match(r"^Finished jobid: (\d+) ", line):
                run.finished.add(by_id[int(match.group(1))])
            elif (match := re.match(r"^total\s+(\d+)$", line)) and run.total is None:
                run.total = int(match.group(1))
    return run


def resume_file(workdir: Path, job: tuple) -> Path:
    model = Path(job[1].split(", ")[0])  # a training's first output is its model.pt
    return workdir / model.with_name(model.stem + ".resume.pt")


def group_members(pgid: int) -> list[str]:
    """The live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, _, rest = stat.read_text().rpartition(")")
        except OSError:
            continue
        state, _, group = rest.split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(f"{stat.parent.name} {name.partition('(')[2]}")
    return members


def interrupt(workdir: Path, log: Path, sig: signal.Signals, target) -> tuple[Run, tuple]:
    """Run the smoke workflow until target(run) names a job, then send `sig` to Snakemake's process group; the run
    as its log tells it, and the job. Fails if the run ends first, or if a process of the group outlives it."""
    process = start_snakemake(workdir, log, *SMOKE)
    deadline, size, run, job = time.monotonic() + TIMEOUT, -1, Run(), None
    try:
        while job is None:
            if process.poll() is not None:
                pytest.fail(
                    f"the run ended (exit {process.returncode}) before its {sig.name}:\n{log.read_text()[-3000:]}"
                )
            assert time.monotonic() < deadline, f"no moment for {sig.name} within {TIMEOUT} s (see {log})"
            if log.stat().st_size != size:
                size = log.stat().st_size
                run = read_log(log.read_text())
            job = target(run)
            if job is None:
                time.sleep(POLL)
        os.killpg(process.pid, sig)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:  # a failed wait: leave nothing running
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for _ in range(300):
        if not (left := group_members(process.pid)):
            break
        time.sleep(0.1)
    assert not left, f"after {sig.name} to the group, still running: {left}"
    return read_log(log.read_text()), job


@pytest.fixture(scope="module")
def interrupted(repo, tmp_path_factory):
    workdir = copy_repo(repo, tmp_path_factory.mktemp("interrupted") / "repo")
    runs, started = [], time.monotonic()
    finished = set()  # jobs finished in the runs before
    mtimes = {}  # modification time of every file a finished job wrote, when it was finished

    def record(run: Run) -> None:
        runs.append(run)
        finished.update(run.finished)
        for _, outputs in run.finished:
            for path in filter(None, outputs.split(", ")):
                if (workdir / path).is_file():
                    mtimes[path] = (workdir / path).stat().st_mtime_ns

    def killed_training(run: Run):
        return next((j for j in run.in_flight() if j[0] in TRAINING and resume_file(workdir, j).exists()), None)

    def training_past_its_resumable_state(run: Run):
        done = finished | run.finished
        if sum(rule == "train_subset" for rule, _ in done) < 2:  # some retrained models must be there to keep
            return None
        return killed_training(run)

    def scores_in_flight(run: Run):
        if not any(rule == "scores" for rule, _ in finished | run.finished):
            return None
        return next((j for j in run.in_flight() if j[0] == "scores"), None)

    # 1. SIGKILL while a model trains. It may finish between the check and the kill (its resumable state is then
    #    gone, the kill came too late): kill again at the next training.
    for attempt in range(3):
        if attempt:
            assert snakemake(workdir, "--unlock", *SMOKE).returncode == 0
        log = workdir.parent / f"kill{attempt}.log"
        run, _ = interrupt(workdir, log, signal.SIGKILL, training_past_its_resumable_state)
        record(run)
        if killed := killed_training(run):
            break
    else:
        pytest.fail("three SIGKILLs came after the training they aimed at had finished")
    # 2. The killed Snakemake's lock stays: the next run stops before any job and says to unlock.
    refused = snakemake(workdir, *SMOKE)
    assert refused.returncode != 0, "a rerun after SIGKILL ran: the killed run's lock was not there"
    unlocked = snakemake(workdir, "--unlock", *SMOKE)
    assert unlocked.returncode == 0, (unlocked.stdout + unlocked.stderr)[-3000:]
    # 3. Ctrl-C while scores are computed
    run, stopped = interrupt(workdir, workdir.parent / "ctrl-c.log", signal.SIGINT, scores_in_flight)
    record(run)
    locks_after_ctrl_c = sorted(p.name for p in (workdir / ".snakemake/locks").glob("*"))
    if locks_after_ctrl_c:  # a failure of its own (test below); unlock so that the other checks still run
        snakemake(workdir, "--unlock", *SMOKE)
    # 4. to the end
    final = snakemake(workdir, *SMOKE)
    assert final.returncode == 0, final.stderr[-5000:]
    record(read_log(final.stdout + final.stderr))
    print(f"interrupted smoke run (kill, unlock, Ctrl-C, rerun): {time.monotonic() - started:.0f} s wall")
    return {
        "workdir": workdir,
        "runs": runs,
        "refused": refused.stdout + refused.stderr,
        "killed": killed,
        "stopped": stopped,
        "mtimes": mtimes,
        "locks_after_ctrl_c": locks_after_ctrl_c,
    }


def test_reruns_redo_only_the_jobs_running_at_a_signal(interrupted):
    runs = interrupted["runs"]
    finished_in = {}
    for i, run in enumerate(runs):
        for job in run.started:
            assert job not in finished_in, f"{job} finished in run {finished_in[job]} and was run again in run {i}"
        finished_in |= dict.fromkeys(run.finished, i)
    planned = set().union(*(run.started for run in runs))
    assert len(planned) == runs[0].total, "the runs together are not the smoke workflow's plan"
    # a job running at a signal was either finished just as it came, or is run again; everything else finished
    in_flight = set().union(*(run.in_flight() for run in runs[:-1]))
    assert planned - set(finished_in) <= in_flight
    for job in (interrupted["killed"], interrupted["stopped"]):  # both certainly cut short
        later = [i for i, run in enumerate(runs) if job in run.started]
        assert len(later) >= 2 and job in runs[later[-1]].finished, (job, later)
    # the files of finished jobs were not written again
    mtimes = interrupted["mtimes"]
    workdir = interrupted["workdir"]
    assert sum("/models/subset" in path for path in mtimes) >= 2, sorted(mtimes)
    rewritten = [path for path, mtime in mtimes.items() if (workdir / path).stat().st_mtime_ns != mtime]
    assert not rewritten, f"outputs of finished jobs written again: {rewritten}"


def test_a_killed_run_leaves_its_lock_until_unlock(interrupted):
    out = interrupted["refused"]
    assert "Directory cannot be locked" in out and "--unlock" in out, out[-3000:]
    assert not read_log(out).started, out[-3000:]  # stopped before any job


def test_ctrl_c_releases_snakemakes_lock(interrupted):
    assert not interrupted["locks_after_ctrl_c"], "Snakemake left its lock after Ctrl-C: rerunning needs --unlock"


def test_killed_training_resumes_to_the_uninterrupted_model(interrupted, smoke_run, smoke_config):
    workdir = interrupted["workdir"]
    killed = interrupted["killed"]
    log = next(run.started[killed] for run in reversed(interrupted["runs"]) if killed in run.started)
    resume = resume_file(Path(), killed)
    text = (workdir / log).read_text()
    assert f"resuming {resume} from step {smoke_config['train']['resume_every']}" in text, text[-2000:]
    assert not (workdir / resume).exists()  # removed once the model is written
    model = killed[1].split(", ")[0]
    assert (workdir / model).read_bytes() == (smoke_run / model).read_bytes(), model


def test_tables_after_kill_and_ctrl_c_equal_the_uninterrupted_run(interrupted, smoke_run):
    ours = interrupted["workdir"] / "results/smoke/tables"
    reference = smoke_run / "results/smoke/tables"
    names = sorted(p.name for p in reference.glob("*.csv"))
    assert len(names) >= 7 and names == sorted(p.name for p in ours.glob("*.csv"))
    different = [name for name in names if (ours / name).read_bytes() != (reference / name).read_bytes()]
    assert not different, f"tables that differ from the uninterrupted run's: {different}"
