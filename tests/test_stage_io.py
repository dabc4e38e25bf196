"""Stage I/O helpers: atomic writes leave nothing behind on failure; params paths stay in the project."""

from __future__ import annotations

import json
import os
import stat

import pytest

from stages.common import StageError, atomic_dir, atomic_write, atomic_write_json, resolve_path


def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"b": 1, "a": 2})
    assert list(json.loads(target.read_text())) == ["a", "b"]

    def boom(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "models"
    with atomic_dir(out) as d:
        (d / "w.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "w.txt").write_text("v2")
            raise RuntimeError("killed")
    assert (out / "w.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_params_paths_cannot_escape_the_project(tmp_path):
    assert resolve_path("data/x.jsonl", tmp_path) == (tmp_path / "data/x.jsonl").resolve()
    assert resolve_path("/abs/elsewhere.jsonl", tmp_path).as_posix() == "/abs/elsewhere.jsonl"
    with pytest.raises(StageError, match=r"escapes the project directory"):
        resolve_path("../../etc/passwd", tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_outputs_honour_the_umask(tmp_path, umask):
    """Files and folders written atomically get the mode a plain open/mkdir would give them (mkstemp and
    mkdtemp alone create 0600 / 0700, unreadable by a teammate on a shared filesystem)."""
    old = os.umask(umask)
    try:
        f = atomic_write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "x.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
