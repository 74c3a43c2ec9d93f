"""What every datasets/<name>/prepare.py shares: an atomic, idempotent build of one output folder.

A build is written into a sibling ``<out>.tmp-<pid>-*`` folder, ``build.json`` (the arguments and the counts)
last, then renamed into place: an interrupted build never leaves a complete-looking folder, and a folder whose
``build.json`` holds the same arguments is up to date. Scripts import this module after putting ``datasets/``
on ``sys.path`` (datasets/ is not a package).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")
MANIFESTS = {f"{split}.jsonl" for split in SPLITS}


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def is_up_to_date(out: Path, config: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((out / "build.json").read_text())["config"] == config)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_stale_tmp(out: Path) -> None:
    """Delete temporary build folders left by builds of `out` that were killed hard (SIGKILL, power loss)."""
    for path in out.parent.glob(f"{out.name}.tmp-*-*"):
        pid = path.name.removeprefix(f"{out.name}.tmp-").split("-")[0]
        try:
            os.kill(int(pid), 0)  # signal 0: only checks that the process exists
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def build_atomically(
    out: Path,
    config: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    entries: set[str],
    force: bool = False,
) -> dict[str, Any] | None:
    """Run ``build(tmp)`` (it fills the empty folder ``tmp`` and returns build.json's extra contents) and move
    the result to ``out``. Returns build.json's contents, or None when ``out`` is already up to date.
    Refuses (ValueError) to replace an ``out`` that holds anything but ``entries`` and build.json."""
    out = out.resolve()
    if not force and is_up_to_date(out, config):
        return None
    if out.exists() and not (out.is_dir() and set(os.listdir(out)) <= entries | {"build.json"}):
        raise ValueError(f"refusing to replace {out}: it holds files that are not part of a build")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset folder should not be
    old = tmp.with_name(tmp.name + "-old")
    try:
        meta = {"config": config} | build(tmp)
        write_json_atomic(tmp / "build.json", meta)  # last file: marks the build complete
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
    return meta


def run_main(main: Callable[[], int]) -> None:
    """Entry point of a prepare script: SIGTERM runs the cleanup, errors end with one line."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.perf_counter()
    try:
        code = main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if code == 0:
        print(f"done in {time.perf_counter() - start:.1f} s")
    sys.exit(code)
