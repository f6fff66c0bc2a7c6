"""Running Snakemake on a scratch copy of the repository (shared by the workflow and Slurm tests)."""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

IGNORE = shutil.ignore_patterns(".venv", "results", ".snakemake", ".git", ".dvc", "__pycache__", ".pytest_cache")
BIN = Path(sys.executable).parent


def copy_repo(repo: Path, workdir: Path) -> Path:
    shutil.copytree(repo, workdir, ignore=IGNORE)
    return workdir


def environment(workdir: Path, env: dict | None = None) -> dict:
    """Only the venv and the system on PATH, HOME in the scratch copy (plus `env`)."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(workdir), **(env or {})}


def snakemake(workdir: Path, *args: str, cores: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`snakemake [--cores 2] args` in workdir with only the venv and the system on PATH (plus `env`)."""
    exe = BIN / "snakemake"
    return subprocess.run(
        [str(exe), *(["--cores", "2"] if cores else []), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=environment(workdir, env),
    )


def _default_interrupt_handling() -> None:
    """In the child before exec: SIGINT and SIGQUIT back to their defaults. A shell ignores both in the commands it
    starts in the background (`.ci/run &`), and an ignored signal stays ignored across exec, so Snakemake would
    not see the Ctrl-C the interruption test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def start_snakemake(workdir: Path, log: Path, *args: str) -> subprocess.Popen:
    """`snakemake --cores 2 args` in the background, its output in `log`, in a process group of its own (Snakemake
    and its local jobs), so that a signal to the group reaches them all, as Ctrl-C in a terminal does."""
    with log.open("w") as out:
        return subprocess.Popen(
            [str(BIN / "snakemake"), "--cores", "2", *args],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment(workdir),
            start_new_session=True,
            preexec_fn=_default_interrupt_handling,
        )


def overlay_run(repo: Path, workdir: Path, overlay: str, tiny: dict) -> Path:
    """An overlay of configs/ shrunk by the `tiny` settings (written as tiny.yaml), run end to end in a scratch copy;
    returns its results directory (results/<tiny's benchmark>)."""
    import yaml

    copy_repo(repo, workdir)
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    result = snakemake(workdir, "--configfile", overlay, "tiny.yaml")
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir / "results" / tiny["benchmark"]
