"""The how-to-get-the-data hints print commands to copy and paste: data.root (or model.pipeline) is quoted, so a path
with spaces, quotes or shell characters comes through the shell (and Python) as itself."""

import ast
import shlex
from pathlib import Path

import pytest

from workflow_scripts.core import artbench, celeba, datasets
from workflow_scripts.families import latent

ROOT = Path("/data/my data/it's $HOME; rm -rf x")


def _command(hint: str, start: str) -> list[str]:
    """The hint's line that starts with `start`, split as a POSIX shell splits it."""
    line = next(line.strip() for line in hint.splitlines() if line.strip().startswith(start))
    return shlex.split(line.split("   (")[0])  # drop a trailing "(md5 ...)" remark


def _torchvision_root(argv: list[str]) -> str:
    """The root the `python -c` command passes to torchvision (its first argument, a string literal)."""
    assert argv[:2] == ["python", "-c"], argv
    call = ast.parse(argv[2]).body[-1].value
    return ast.literal_eval(call.args[0])


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_torchvision_hint_quotes_the_root(dataset):
    hint = datasets._how_to_get(dataset, ROOT)
    assert _torchvision_root(_command(hint, "python -c")) == str(ROOT)


def test_cifar_manual_command_quotes_the_root():
    hint = datasets._how_to_get("cifar10", ROOT)
    tar = hint.split("&& ")[1].split(" (then")[0]
    assert shlex.split(tar)[-2:] == ["-C", str(ROOT)]


def test_celeba_hint_quotes_the_root():
    assert _torchvision_root(_command(celeba.how_to_get(ROOT), "python -c")) == str(ROOT)


def test_artbench_hints_quote_the_root():
    imagefolder = artbench.how_to_get(ROOT, "imagefolder")
    assert _command(imagefolder, "wget")[1:3] == ["-P", str(ROOT)]
    assert _command(imagefolder, "tar")[2:] == [str(ROOT / artbench.TAR_NAME), "-C", str(ROOT)]
    batches = artbench.how_to_get(ROOT, "batches")
    assert shlex.split(batches.split("&& ")[1].splitlines()[0])[-2:] == ["-C", str(ROOT)]


def test_pipeline_hint_quotes_the_directory(tmp_path):
    where = tmp_path / "base pipeline's dir"
    with pytest.raises(latent.PipelineMissing) as error:
        latent.check_pipeline_dir(where)
    argv = shlex.split(str(error.value).split("once with: ")[1].split("   (")[0])
    assert argv[-2:] == ["--local-dir", str(where)]
