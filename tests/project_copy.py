"""A throwaway git + DVC copy of the project (no dvc.lock, no outputs), and running commands in it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "CI": "true",
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
       "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost",
       "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@localhost"}


def sh(cmd: list[str], cwd: Path, timeout: float = 1200) -> str:
    """Run ``cmd`` in ``cwd``; its stdout + stderr, or an assertion error holding both."""
    p = subprocess.run(cmd, cwd=cwd, env=ENV, text=True, capture_output=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


def ran(out: str) -> list[str]:
    """The stages a ``dvc repro`` log says it ran, sorted."""
    return sorted(re.findall(r"Running stage '([^']+)'", out))


def ran_work(out: str) -> list[str]:
    """:func:`ran` without ``track_inputs`` and ``track_models``, which run on every ``dvc repro``
    (``always_changed``)."""
    return [s for s in ran(out) if not s.startswith(("track_inputs@", "track_models@"))]


def copy_project(dst: Path) -> Path:
    """Copy the project's tracked and untracked-but-not-ignored files (no dvc.lock, no outputs) to ``dst``,
    with a DVC config that has no remotes, as a git repository with one commit."""
    files = subprocess.check_output(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                                    cwd=ROOT, text=True).split("\n")
    for f in filter(None, files):
        if f == "dvc.lock" or f.startswith(("artifacts/", "figs/", "data/prepared/")) or not (ROOT / f).exists():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    (dst / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    sh(["git", "init", "-q", "-b", "main"], dst)
    sh(["git", "add", "-A"], dst)
    sh(["git", "commit", "-qm", "base"], dst)
    return dst
