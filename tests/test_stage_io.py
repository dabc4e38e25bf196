"""Stage I/O helpers: atomic writes leave nothing behind on failure; params paths stay in the project."""

from __future__ import annotations

import errno
import json
import os
import re
import stat

import pandas as pd
import pytest
import torch

from stages.common import StageError, atomic_dir, atomic_write, atomic_write_json, finite, resolve_path


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
    assert resolve_path("/abs/elsewhere.jsonl", tmp_path, allow_outside=True).as_posix() == "/abs/elsewhere.jsonl"
    with pytest.raises(StageError, match="leaves the project directory"):
        resolve_path("/abs/elsewhere.jsonl", tmp_path)
    with pytest.raises(StageError, match=r"leaves the project directory"):
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


def test_a_non_finite_number_is_never_written_and_the_old_file_stays(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": 1.0})
    for bad, key in (({"a": float("nan")}, "a"), ({"x": {"y": [0.0, float("inf")]}}, "x.y[1]")):
        with pytest.raises(StageError, match=rf"non-finite .* at {re.escape(key)}"):
            atomic_write_json(path, bad)
        assert json.loads(path.read_text()) == {"a": 1.0}
    atomic_write_json(path, finite({"a": float("nan")}))  # "not measured", said explicitly
    assert json.loads(path.read_text()) == {"a": None}


def test_loaded_activations_with_a_nan_are_refused_naming_tensor_layer_and_prompt(tmp_path):
    from safetensors.torch import save_file

    from stages.acts_io import load_mode

    (tmp_path / "strict").mkdir()
    (tmp_path / "fingerprint.json").write_text(json.dumps({"model": "m"}))
    pd.DataFrame({"id": ["p0", "p1", "p2"]}).to_parquet(tmp_path / "strict" / "index.parquet")
    x = torch.zeros(3, 4)
    tuned = x.clone()
    tuned[2, 1] = float("nan")
    save_file({"base.layers.5.resid_post": x, "tuned.layers.5.resid_post": tuned},
              str(tmp_path / "strict" / "shard-00000.safetensors"), metadata={"fingerprint": json.dumps({"model": "m"})})
    with pytest.raises(StageError, match=r"tuned\.layers\.5\.resid_post .* row 2, prompt 'p2'"):
        load_mode(tmp_path, "strict")
    tuned[2, 1] = 0.0
    save_file({"base.layers.5.resid_post": x, "tuned.layers.5.resid_post": tuned},
              str(tmp_path / "strict" / "shard-00000.safetensors"), metadata={"fingerprint": json.dumps({"model": "m"})})
    index, states = load_mode(tmp_path, "strict")
    assert list(states) == [5] and states[5][1].shape == (3, 4)


def test_truncated_tables_and_tensors_are_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    from stages.common import read_table, read_tensors

    pd.DataFrame({"id": ["a", "b"], "x": [1.0, 2.0]}).to_parquet(tmp_path / "t.parquet")
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "t.safetensors"))
    for path, read in ((tmp_path / "t.parquet", read_table), (tmp_path / "t.safetensors", read_tensors)):
        data = path.read_bytes()
        read(path)  # whole: reads
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(StageError, match=rf"{re.escape(str(path))} cannot be read .* truncated or corrupt"):
            read(path)
        with pytest.raises(StageError, match="not found"):
            read(tmp_path / "missing")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_disk_or_unwritable_output_is_one_line_and_exit_2(code, capsys):
    from stages.common import run_stage

    def main():
        raise OSError(code, os.strerror(code), "/out/report.json")

    with pytest.raises(SystemExit) as exit_:
        run_stage(main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: cannot write /out/report.json: " + os.strerror(code))


def test_other_os_errors_keep_their_traceback():
    from stages.common import run_stage

    def main():
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError):
        run_stage(main)


def test_progress_bars_show_on_a_terminal_and_stay_quiet_under_ci(monkeypatch):
    import sys

    from stages.common import progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert not progress([1, 2], "x").disable and list(progress([1, 2], "x")) == [1, 2]
    monkeypatch.setenv("CI", "true")
    assert progress([1, 2], "x").disable
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress([1, 2], "x").disable  # a log file gets no bar
