"""Checkpoint files in one process: opening one runs no code, a run rotates only its own
checkpoints, one job holds a directory at a time, writes are durable, and a torn latest falls
back to the previous complete checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hap.runtime import checkpoint as ckpt

LAYOUT = {"layout": {"w": {"shape": [4, 3], "dim": None, "lengths": None, "aliases": ["w"], "dtype": "float32"}},
          "optimizer": {}, "buffers": {}}


def save(d, step, run_id, value=1.0, keep=ckpt.KEEP):
    return ckpt.save(d, step, {"model/w": torch.full((4, 3), value)}, dict(LAYOUT), 0, lambda: None, run_id,
                     keep=keep)


def loaded(path, trust=False):
    out = {"model/w": torch.empty(4, 3)}
    ckpt.load(str(path), out, trust)
    return out["model/w"]


class Payload:
    """Unpickling this runs ``touch`` on the file it names: what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (subprocess.call, (["touch", self.path],))


def test_the_run_state_is_json_and_an_old_pickle_that_runs_code_is_refused_unrun(tmp_path):
    step = save(tmp_path / "ck", 3, "aaaa")
    meta = json.loads((step / ckpt.META).read_text())  # plain data
    assert meta["format"] == ckpt.FORMAT and meta["run_id"] == "aaaa" and meta["step"] == 3
    hostile = tmp_path / "hostile" / "step_000001"
    hostile.mkdir(parents=True)
    ran = tmp_path / "ran"
    torch.save({"format": ckpt.LEGACY_FORMAT, "step": 1, "x": Payload(ran)}, hostile / ckpt.LEGACY_META)
    with pytest.raises(ckpt.CheckpointError, match="not readable as plain data"):
        ckpt.read_meta(hostile)
    assert not ran.exists()


def test_an_older_checkpoints_plain_state_still_reads(tmp_path):
    step = save(tmp_path / "ck", 5, "aaaa")
    meta = json.loads((step / ckpt.META).read_text())
    (step / ckpt.META).unlink()
    torch.save({**{k: v for k, v in meta.items() if k not in ("run_id", "files")}, "format": ckpt.LEGACY_FORMAT},
               step / ckpt.LEGACY_META)
    old = ckpt.read_meta(tmp_path / "ck")
    assert old["step"] == 5 and old["layout"] == LAYOUT["layout"]
    assert torch.equal(loaded(old["path"]), torch.full((4, 3), 1.0))


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_a_metadata_pickle_of_another_user_loads_only_when_trusted(tmp_path):
    step = save(tmp_path / "ck", 1, "aaaa")
    os.chown(step / ".metadata", 12345, 12345)
    with pytest.raises(ckpt.CheckpointError, match="--trust-checkpoint"):
        loaded(step)
    with pytest.raises(ckpt.CheckpointError, match="runs whatever code"):
        ckpt.stored_keys(str(step))
    assert torch.equal(loaded(step, trust=True), torch.full((4, 3), 1.0))


def test_a_run_rotates_only_its_own_checkpoints(tmp_path):
    """An earlier run's step_001000 outranks every step of a new 200-step run: rotating by step
    number alone deleted each new checkpoint as soon as it was written."""
    d = tmp_path / "ck"
    for s in (900, 1000):
        save(d, s, "old")
    for s in (50, 100, 150, 200):
        save(d, s, "new")
    assert [c.name for c in ckpt.checkpoints(d)] == ["step_000150", "step_000200", "step_000900", "step_001000"]
    assert (d / ckpt.LATEST).read_text().strip() == "step_000200"
    assert ckpt.latest(d, "new")[0].name == "step_000200" and ckpt.latest(d, "old")[0].name == "step_001000"
    assert [c.name for c in ckpt.foreign(d, "new")] == ["step_000900", "step_001000"]


def test_a_second_live_job_is_refused_with_the_holders_pid_and_host(tmp_path):
    d = tmp_path / "ck"
    assert ckpt.lock(d, "job-a", 0, "aaaa", 7) == ("aaaa", None)
    with pytest.raises(ckpt.CheckpointError, match=rf"in use by pid {os.getpid()} on host \S+"):
        ckpt.lock(d, "job-b", 0, "bbbb", 8)
    # a restarted attempt of the same job continues its run
    assert ckpt.lock(d, "job-a", 1, "cccc", 9)[0] == "aaaa"
    assert ckpt.lock_nonce(d) == 9
    ckpt.unlock(d, "aaaa")
    assert not (d / ckpt.LOCK).exists()


def test_a_dead_jobs_lock_is_taken_over(tmp_path):
    d = tmp_path / "ck"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ckpt.lock(d, "job-a", 0, "aaaa", 1)
    holder = json.loads((d / ckpt.LOCK).read_text())
    (d / ckpt.LOCK).write_text(json.dumps({**holder, "pid": dead.pid}))
    run_id, note = ckpt.lock(d, "job-b", 0, "bbbb", 2)
    assert run_id == "bbbb" and f"pid {dead.pid}" in note and "no longer running" in note


def test_a_checkpoint_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    step = save(tmp_path / "ck", 4, "aaaa")
    tmp = str(tmp_path / "ck" / ".step_000004.tmp-aaaa")
    moved = next(i for i, e in enumerate(events) if e == ("replace", tmp, str(step)))
    synced = {e[1] for e in events[:moved] if e[0] == "fsync"}
    assert tmp in synced  # the directory's entries: hap.json renamed into it
    assert any(s.startswith(f"{tmp}/.{ckpt.META}.tmp") for s in synced)  # hap.json's bytes, before its rename
    assert any(s.startswith(f"{tmp}/__0_") for s in synced)  # the shard file (DCP's sync_files)
    assert ("fsync", str(tmp_path / "ck")) in events[moved:]  # the rename itself made durable


def test_a_torn_latest_falls_back_to_the_previous_complete_checkpoint(tmp_path):
    d = tmp_path / "ck"
    save(d, 2, "aaaa", value=2.0)
    newest = save(d, 4, "aaaa", value=4.0)
    shard = next(newest.glob("__0_*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])  # a power loss mid-write of the data
    found, note = ckpt.latest(d)
    assert found.name == "step_000002" and "step_000004" in note and "bytes" in note
    meta = ckpt.read_meta(d)
    assert meta["step"] == 2 and meta["note"] == note
    assert torch.equal(loaded(meta["path"]), torch.full((4, 3), 2.0))
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint"):
        ckpt.read_meta(newest)
    (d / ckpt.LATEST).unlink()  # lost with the crash: the step directories still say what is there
    assert ckpt.latest(d)[0].name == "step_000002"


def test_a_stop_note_is_read_by_its_own_run_only(tmp_path):
    ckpt.mark_stopped(tmp_path, "aaaa", 7, "loss is nan")
    assert ckpt.stopped(tmp_path, "aaaa") == {"run_id": "aaaa", "step": 7, "reason": "loss is nan"}
    assert ckpt.stopped(tmp_path, "bbbb") is None
