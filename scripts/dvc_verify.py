"""Check that every output recorded in dvc.lock has, in this checkout, the content dvc.lock records.

    python scripts/dvc_verify.py [--cache DIR] [--remove]

Why: `dvc pull` trusts what it downloads. An object edited or garbled on the remote is checked out as it is (for a
file inside a directory output, with no warning), DVC records the expected hash for it in its state database, and
`dvc status` then calls the corrupt file up to date; a later `dvc repro` or `dvc commit` writes its hash into
dvc.lock. So this script re-hashes the workspace itself (md5 of the bytes, DVC 3's `hash: md5`): every file output,
and every file of a directory output against the directory's manifest (the `.dir` object in the DVC cache, itself
checked against dvc.lock). Without the manifest in the cache, the directory's hash is recomputed as DVC does it and
only the directory can be named.

--cache DIR: the DVC cache (`dvc cache dir`; default .dvc/cache).
--remove: delete each file whose content is wrong from the workspace and from the DVC cache (scripts/dvc-pull does
after a pull: the bad copies came from the remote, and neither Snakemake nor DVC must take them for results).

Exit status: 0 every recorded file matches; 1 some file is missing or differs (listed on stderr); 2 dvc.lock cannot
be checked (absent, or recorded by DVC 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import yaml

CHUNK = 1 << 20


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_object(cache: Path, md5: str) -> Path:
    """Where DVC 3 keeps an object (files/md5/ab/cdef...), else where DVC 2 kept it (ab/cdef...)."""
    current = cache / "files" / "md5" / md5[:2] / md5[2:]
    legacy = cache / md5[:2] / md5[2:]
    return current if current.exists() or not legacy.exists() else legacy


def lock_outputs(lock: dict) -> list[dict]:
    """Every out (metrics and plots included: dvc.lock lists them as outs) of every stage."""
    return [out for stage in (lock.get("stages") or {}).values() for out in stage.get("outs", [])]


def ignored(relpath: str) -> bool:
    """The repository's .dvcignore patterns (Python byte code), which DVC leaves out of a directory's manifest."""
    parts = relpath.split("/")
    return "__pycache__" in parts or relpath.endswith(".pyc") or any(p.endswith(".egg-info") for p in parts)


def directory_md5(directory: Path) -> str:
    """The hash DVC records for a directory: md5 of its manifest, [{"md5", "relpath"}] sorted by path components."""
    entries = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            relpath = path.relative_to(directory).as_posix()
            if not ignored(relpath):
                entries.append((tuple(relpath.split("/")), {"md5": md5_of(path), "relpath": relpath}))
    manifest = [entry for _, entry in sorted(entries, key=lambda pair: pair[0])]
    return hashlib.md5(json.dumps(manifest, sort_keys=True).encode()).hexdigest() + ".dir"


def check_directory(out: Path, expected: str, cache: Path) -> list[tuple[str, str, str | None]]:
    """[(path, problem, md5 its cache object is stored under)] of one directory output."""
    manifest_path = cache_object(cache, expected.removesuffix(".dir") + ".dir")
    manifest = None
    if manifest_path.exists():
        if md5_of(manifest_path) == expected.removesuffix(".dir"):
            manifest = json.loads(manifest_path.read_text())
        else:
            return [(str(out), f"its manifest in the DVC cache ({manifest_path}) is corrupt", expected)]
    if manifest is None:  # no cache (results restored by other means): only the whole directory can be compared
        found = directory_md5(out)
        if found == expected:
            return []
        return [(str(out), f"content hash {found}, dvc.lock records {expected} (no manifest to name the files)", None)]
    problems = []
    for entry in manifest:
        path = out / entry["relpath"]
        if not path.is_file():
            problems.append((str(path), "missing", None))
            continue
        found = md5_of(path)
        if found != entry["md5"]:
            problems.append((str(path), f"content md5 {found}, dvc.lock records {entry['md5']}", entry["md5"]))
    return problems


def verify(root: Path, cache: Path) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(problems, errors): the files whose content is not what dvc.lock records, and why dvc.lock cannot be used."""
    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        return [], [f"{lock_path}: missing; nothing to verify against (run `dvc repro` or `dvc commit`)"]
    problems, errors = [], []
    for out in lock_outputs(yaml.safe_load(lock_path.read_text()) or {}):
        path, expected = root / out["path"], out.get("md5")
        if out.get("hash") != "md5" or not expected:
            errors.append(
                f"{out['path']}: dvc.lock records no DVC 3 md5 for it (hash {out.get('hash')!r}); "
                "record it again with DVC 3 (`dvc commit -f`) to make it verifiable"
            )
        elif expected.endswith(".dir"):
            if path.is_dir():
                problems += check_directory(path, expected, cache)
            else:
                problems.append((str(path), "missing (a directory in dvc.lock)", None))
        elif not path.is_file():
            problems.append((str(path), "missing", None))
        else:
            found = md5_of(path)
            if found != expected:
                problems.append((str(path), f"content md5 {found}, dvc.lock records {expected}", expected))
    return problems, errors


def remove(problems, root: Path, cache: Path) -> None:
    """Delete the wrong files and the cache objects stored under their expected hashes (the corrupt bytes)."""
    for path, _, md5 in problems:
        target = Path(path)
        if target.is_file() and md5 is not None:
            target.unlink()
        if md5 is not None:
            cache_object(cache, md5).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help="the DVC cache directory (default .dvc/cache)")
    parser.add_argument("--remove", action="store_true", help="delete wrong files from the workspace and the cache")
    parser.add_argument("--root", type=Path, default=Path("."), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.root
    cache = args.cache or root / ".dvc" / "cache"
    problems, errors = verify(root, cache)
    for error in errors:
        print(f"dvc_verify: {error}", file=sys.stderr)
    if problems:
        print("dvc_verify: these files do not have the content dvc.lock records:", file=sys.stderr)
        for path, problem, _ in problems:
            print(f"    {os.path.relpath(path, root)}: {problem}", file=sys.stderr)
        if args.remove:
            remove(problems, root, cache)
            print("dvc_verify: the wrong files were deleted from the workspace and the DVC cache.", file=sys.stderr)
        return 1
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
