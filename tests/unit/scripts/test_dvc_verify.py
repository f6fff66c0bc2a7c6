"""scripts/dvc_verify.py and its use in scripts/dvc-pull: a file whose content is not what dvc.lock records (an object
edited or garbled on the DVC remote) is refused by name, and never marked up to date.

These tests build a dvc.lock and a DVC cache by hand (no DVC run, fast); tests/workflow/test_dvc.py::
test_pull_script_refuses_a_tampered_remote runs dvc and scripts/dvc-pull on a tiny repository with a tampered remote."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

REPO = next(p for p in Path(__file__).resolve().parents if (p / "Snakefile").is_file())
TABLE = "| method | LDS |\n|---|---|\n| trak | 0.05 |\n"
TAMPERED = TABLE.replace("0.05", "1.0")


@pytest.fixture(scope="module")
def dvc_verify():
    spec = importlib.util.spec_from_file_location("dvc_verify", REPO / "scripts" / "dvc_verify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def put(cache: Path, data: bytes, name: str | None = None) -> str:
    name = name or md5(data)
    obj = cache / "files" / "md5" / name[:2] / name[2:]
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(data)
    return name


def checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A workspace as `dvc pull` leaves it: results/tables (a directory out), results/model.pt (a file out), the
    objects in the cache and dvc.lock recording the true hashes."""
    root, cache = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "cache"
    files = {"lds.md": TABLE.encode(), "counterfactual.md": b"| random | 0.1 |\n"}
    (root / "results" / "tables").mkdir(parents=True)
    for name, data in files.items():
        (root / "results" / "tables" / name).write_bytes(data)
        put(cache, data)
    manifest = [{"md5": md5(data), "relpath": name} for name, data in sorted(files.items())]
    manifest_md5 = md5(json.dumps(manifest, sort_keys=True).encode())
    put(cache, json.dumps(manifest, sort_keys=True).encode(), manifest_md5 + ".dir")
    model = bytes(range(256)) * 16
    (root / "results" / "model.pt").write_bytes(model)
    put(cache, model)
    outs = [
        {"path": "results/tables", "hash": "md5", "md5": manifest_md5 + ".dir", "size": 1, "nfiles": 2},
        {"path": "results/model.pt", "hash": "md5", "md5": md5(model), "size": len(model)},
    ]
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"run": {"cmd": "x", "outs": outs}}}))
    return root, cache


def tamper(root: Path, cache: Path) -> tuple[Path, Path]:
    """What a pull of a tampered remote checks out: the bytes differ, the cache object's name does not."""
    table, model = root / "results/tables/lds.md", root / "results/model.pt"
    for path, data in ((table, TAMPERED.encode()), (model, b"garbled")):
        name = md5(path.read_bytes())
        path.write_bytes(data)
        put(cache, data, name)
    return table, model


def test_intact_checkout_passes(dvc_verify, tmp_path, capsys):
    root, _ = checkout(tmp_path)
    assert dvc_verify.main(["--root", str(root)]) == 0
    assert capsys.readouterr().err == ""


def test_directory_hash_is_dvcs(dvc_verify, tmp_path):
    root, _ = checkout(tmp_path)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert dvc_verify.directory_md5(root / "results/tables") == lock["stages"]["run"]["outs"][0]["md5"]


def test_tampered_files_are_named_and_removed(dvc_verify, tmp_path, capsys):
    root, cache = checkout(tmp_path)
    table, model = tamper(root, cache)
    assert dvc_verify.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "results/tables/lds.md: content md5" in err and "results/model.pt: content md5" in err, err
    assert "counterfactual.md" not in err  # the intact file of the same directory is not named
    assert table.exists()  # without --remove nothing is deleted

    assert dvc_verify.main(["--root", str(root), "--remove"]) == 1
    assert not table.exists() and not model.exists()
    assert (root / "results/tables/counterfactual.md").exists()
    assert not (cache / "files/md5" / md5(TABLE.encode())[:2] / md5(TABLE.encode())[2:]).exists()  # the bad copy


def test_without_a_cache_the_directory_is_named(dvc_verify, tmp_path, capsys):
    root, cache = checkout(tmp_path)
    tamper(root, cache)
    shutil.rmtree(cache)
    assert dvc_verify.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "results/tables: content hash" in err and "no manifest" in err, err


def test_corrupt_manifest_is_named(dvc_verify, tmp_path, capsys):
    root, cache = checkout(tmp_path)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    manifest = dvc_verify.cache_object(cache, lock["stages"]["run"]["outs"][0]["md5"])
    manifest.write_text("[]")
    assert dvc_verify.main(["--root", str(root)]) == 1
    assert "manifest in the DVC cache" in capsys.readouterr().err


def test_lock_of_dvc_2_cannot_be_verified(dvc_verify, tmp_path, capsys):
    root, _ = checkout(tmp_path)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    del lock["stages"]["run"]["outs"][1]["hash"]
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert dvc_verify.main(["--root", str(root)]) == 2
    assert "results/model.pt: dvc.lock records no DVC 3 md5" in capsys.readouterr().err
