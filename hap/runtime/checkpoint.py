"""Sharded, plan-independent checkpoints through ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards, in parallel; nothing is gathered. Layout of ``DIR``:

  DIR/.hap.lock              held while a run writes here: {"pid", "host", "job", "run_id", "nonce", "since"}
  DIR/step_000120/           one DCP checkpoint: .metadata and one __<rank>_0.distcp per rank, and
      hap.json               the layout and the run's state, as JSON (written by rank 0):
                             {"format", "step", "run_id", "files", "data_position", "optimizer_kind",
                              "plan", "shares", "scaler", "layout": {key: {"shape", "dim", "lengths",
                              "aliases", "dtype"}}, "optimizer": {key: {name: entry}},
                              "buffers": {key: {..., "persistent"}}}
  DIR/latest                 the name of the newest checkpoint
  DIR/stopped.json           written when a run stops on a non-finite loss or gradient: a restarted
                             attempt of that run stops too instead of training into it again

Tensors are stored under the single-device ``state_dict`` names: ``model/<key>`` for a
replicated tensor (DCP writes one copy), ``model/<key>/<rank>`` for rank ``rank``'s shard of a
sharded one (the layout gives its dim and every rank's length); optimizer state likewise under
``optim/<key>/<name>``. In a pipelined program each parameter is its stage's, ``<rank>`` the
rank's place in that stage and the layout entry that stage's; ``stage_shares`` then records each
stage's shares and ``shares`` is absent.

What a checkpoint promises (docs/reliability.md):
- atomic: it is written to a hidden directory named after its run, its files fsynced, then
  renamed into place and ``latest`` replaced; a checkpoint whose files are missing or short
  (``files`` records each file's size) is torn, and the newest complete one is used instead;
- a run rotates only its own checkpoints (``run_id``), never another run's;
- one run writes a directory at a time (the lock), and every rank sees it (a nonce in the lock);
- opening one runs no code: ``hap.json`` is JSON. DCP's ``.metadata`` is a pickle, so it is
  loaded only when the current user owns it, or when the user says it is trusted.

Resuming under another plan or number of ranks reads, on each rank, only the stored shards that
overlap its new slice (all of them when the new plan shards another dim), so ``--resume`` works
across plans. ``hap-export`` assembles the whole tensors.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .layout import Layout, rank_slice

FORMAT = "hap-checkpoint/3"
META = "hap.json"
LEGACY_FORMAT, LEGACY_META = "hap-checkpoint/2", "hap.pt"  # torch.save of plain types: read with weights_only
LOCK = ".hap.lock"
STOPPED = "stopped.json"
LATEST = "latest"
KEEP = 2  # checkpoints of a run kept in its --save directory
_STEP = re.compile(r"step_(\d+)$")


class CheckpointError(Exception):
    """A checkpoint cannot be used for this program (another model, a torn directory, ...)."""


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes | Callable[[Path], None]) -> None:
    """Write ``path`` so that it holds the old bytes or the new ones, never a part: a temporary
    file beside it (``data``, or what ``data(tmp)`` writes there), fsynced, renamed over it, and
    the rename made durable. On any failure the temporary is removed and ``path`` is unchanged."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # an unwritable directory: the temporary was never made
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def new_id() -> int:
    """A random id that travels exactly in a float64 all-reduce (48 bits)."""
    return secrets.randbits(48)


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def step_of(path: Path) -> int | None:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(directory: str | Path) -> list[Path]:
    """The ``step_*`` directories of ``directory``, oldest step first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [x for x in d.iterdir() if step_of(x) is not None and x.is_dir()]
    return sorted(found, key=step_of)


def _load_meta(step_dir: Path) -> dict[str, Any]:
    """A step directory's run state: ``hap.json``, or an older checkpoint's ``hap.pt`` read with
    ``weights_only=True`` (plain types only: loading it runs no code)."""
    if (step_dir / META).exists():
        try:
            meta = json.loads((step_dir / META).read_text())
        except (OSError, ValueError) as e:  # a torn or foreign file
            raise CheckpointError(f"{step_dir / META} is not readable: {e}") from e
        expected = FORMAT
    elif (step_dir / LEGACY_META).exists():
        try:
            meta = torch.load(step_dir / LEGACY_META, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn file, or one holding more than plain types
            raise CheckpointError(f"{step_dir / LEGACY_META} is not readable as plain data ({e}); it is not a "
                                  "checkpoint this hap wrote") from e
        expected = LEGACY_FORMAT
    else:
        raise CheckpointError(f"{step_dir} is not a hap checkpoint directory (no {META}); give the --save "
                              "directory of a run or one of its step_* directories")
    if not isinstance(meta, dict) or meta.get("format") != expected:
        fmt = meta.get("format") if isinstance(meta, dict) else "?"
        raise CheckpointError(f"{step_dir} is not a checkpoint of this hap (format {fmt}, expected {FORMAT})")
    meta["path"] = str(step_dir)
    return meta


def torn(step_dir: Path) -> str | None:
    """None when ``step_dir`` is a complete checkpoint, else what is wrong with it."""
    try:
        meta = _load_meta(step_dir)
    except CheckpointError as e:
        return str(e)
    if not (step_dir / ".metadata").exists():
        return f"{step_dir} has no .metadata"
    for name, size in (meta.get("files") or {}).items():  # older checkpoints record no files
        f = step_dir / name
        if not f.exists():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} were written"
    return None


def run_of(step_dir: Path) -> str | None:
    """The run that wrote a checkpoint (None: unreadable, or an older checkpoint without one)."""
    try:
        return _load_meta(step_dir).get("run_id")
    except CheckpointError:
        return None


def latest(directory: str | Path, run_id: str | None = None) -> tuple[Path | None, str | None]:
    """The newest complete checkpoint in ``directory`` (of run ``run_id`` only, when given), and a
    note when that is not the one ``latest`` names (torn, or ``latest`` itself lost)."""
    d = Path(directory)
    pointer = d / LATEST
    named = None
    if pointer.exists():
        try:
            named = d / pointer.read_text().strip()
        except OSError:
            named = None
    candidates = ([named] if named is not None else []) + checkpoints(d)[::-1]
    for c in candidates:
        if step_of(c) is None or not c.is_dir() or torn(c) is not None:
            continue
        if run_id is not None and run_of(c) != run_id:
            continue
        note = None
        if named is not None and c != named:
            why = torn(named) if named.is_dir() else f"{named} does not exist"
            note = f"the latest checkpoint is not usable ({why}); using {c.name}, the newest complete one"
        return c, note
    return None, None


def read_meta(path: str | Path) -> dict[str, Any]:
    """The layout and run state of a checkpoint (a step directory, or a --save DIR: its newest
    complete checkpoint; ``meta["note"]`` says when that is not the one ``latest`` names)."""
    p = Path(path)
    if p.is_dir() and not (p / META).exists() and not (p / LEGACY_META).exists():
        found, note = latest(p)
        if found is None:
            why = "no complete checkpoint" if checkpoints(p) else "no checkpoint (no 'latest' file)"
            raise CheckpointError(f"{p} holds {why}; start without --resume")
        meta = _load_meta(found)
        meta["note"] = note
        return meta
    meta = _load_meta(p)
    problem = torn(p)
    if problem is not None:
        raise CheckpointError(f"{p} is an incomplete checkpoint ({problem}); resume from its --save directory "
                              "to use the newest complete one")
    return meta


def check_trusted(step_dir: str | Path, trust: bool = False) -> None:
    """DCP's ``.metadata`` is a Python pickle, and unpickling runs whatever code it names. Load it
    only when the current user owns it (a checkpoint this user wrote) or ``trust`` says so."""
    md = Path(step_dir) / ".metadata"
    if trust:
        return
    try:
        owner = md.stat().st_uid
    except OSError as e:
        raise CheckpointError(f"{md} cannot be read: {e}") from e
    if owner != os.getuid():
        raise CheckpointError(
            f"{md} belongs to user {_user(owner)}, not to you ({_user(os.getuid())}). A DCP checkpoint's .metadata "
            "is a Python pickle, and loading it runs whatever code it holds: treat a checkpoint like code. If you "
            "trust whoever wrote it, pass --trust-checkpoint (or copy the checkpoint as yourself)")


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def save(directory: str | Path, step: int, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any], rank: int,
         barrier, run_id: str, keep: int = KEEP) -> Path:
    """Write checkpoint ``step`` of run ``run_id``: every rank calls it with its own ``tensors``
    (keys as in the module docstring), rank 0 adds ``meta``. ``barrier()`` synchronises the ranks.
    Afterwards rank 0 removes this run's checkpoints beyond the newest ``keep``."""
    d = Path(directory)
    name = f"step_{step:06d}"
    tmp = d / f".{name}.tmp-{run_id}"  # another run's temporary never collides with this one
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # this run's, left by an attempt that died while writing
    barrier()
    with warnings.catch_warnings():  # one process (no group) is a legitimate single-rank save
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _dcp().save(dict(tensors), checkpoint_id=str(tmp))  # every file fsynced (sync_files)
    if rank == 0:
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        atomic_write(tmp / META, json.dumps({"format": FORMAT, "step": step, "run_id": run_id, "files": files,
                                             **meta}))
        target = d / name
        if target.exists():  # a restarted attempt of this run writes a step again
            if run_of(target) != run_id:
                raise CheckpointError(f"{target} belongs to another run; it is left as it is")
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(d)
        atomic_write(d / LATEST, name + "\n")
        if keep > 0:
            for old in [c for c in checkpoints(d) if run_of(c) == run_id][:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return d / name


def lock(directory: str | Path, job: str, restarts: int, run_id: str, nonce: int) -> tuple[str, str | None]:
    """Take ``directory``'s lock for this run; returns the run id to use (a restarted attempt
    continues its run's) and a note when a dead job's lock was taken over. Another live job's
    lock is a CheckpointError naming its pid and host."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path, note = d / LOCK, None
    host = socket.gethostname()
    mine = {"pid": os.getpid(), "host": host, "job": job, "run_id": run_id, "nonce": nonce, "since": time.time()}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        holder = _read_json(path)
        if holder is None:  # torn by a crash while it was written
            note = f"removed an unreadable lock {path}"
        elif restarts > 0 and holder.get("job") == job:
            mine["run_id"] = run_id = holder.get("run_id", run_id)  # this job's earlier attempt
        elif holder.get("host") == host and not _alive(holder.get("pid")):
            note = f"took over the lock of pid {holder.get('pid')} on {host}, which is no longer running"
        else:
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.get("since", 0)))
            raise CheckpointError(
                f"--save {d} is in use by pid {holder.get('pid')} on host {holder.get('host')} (since {since}); "
                f"two jobs must not write one directory: save this run elsewhere (--save NEWDIR), or, if that "
                f"job is gone, remove {path}") from None
        atomic_write(path, json.dumps(mine))
        return run_id, note
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(mine))
        f.flush()
        os.fsync(f.fileno())
    return run_id, note


def unlock(directory: str | Path, run_id: str) -> None:
    """Release the lock, if this run still holds it."""
    path = Path(directory) / LOCK
    holder = _read_json(path)
    if holder is not None and holder.get("run_id") == run_id and holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def lock_nonce(directory: str | Path) -> int | None:
    """The nonce in ``directory``'s lock as this rank sees it (None: no lock visible here)."""
    holder = _read_json(Path(directory) / LOCK)
    return None if holder is None else holder.get("nonce")


def foreign(directory: str | Path, run_id: str) -> list[Path]:
    """The checkpoints in ``directory`` another run wrote."""
    return [c for c in checkpoints(directory) if run_of(c) != run_id]


def remove_temporaries(directory: str | Path) -> None:
    """Remove the hidden directories of checkpoints that were being written when their run died
    (called while holding the lock: no other run writes here)."""
    for x in Path(directory).glob(".step_*.tmp*"):
        if x.is_dir():
            shutil.rmtree(x, ignore_errors=True)


def mark_stopped(directory: str | Path, run_id: str, step: int, reason: str) -> None:
    """Leave a note that run ``run_id`` stopped for good at ``step`` (read by ``stopped``)."""
    atomic_write(Path(directory) / STOPPED, json.dumps({"run_id": run_id, "step": step, "reason": reason}))


def stopped(directory: str | Path, run_id: str) -> dict[str, Any] | None:
    """The note ``mark_stopped`` left for this run, if any."""
    note = _read_json(Path(directory) / STOPPED)
    return note if note is not None and note.get("run_id") == run_id else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def check_model(meta: dict[str, Any], shapes: Mapping[str, Sequence[int]]) -> None:
    """Refuse a checkpoint of another model: every planned parameter must be there, same shape."""
    layout = meta["layout"]
    stored = {alias: tuple(e["shape"]) for e in layout.values() for alias in e["aliases"]}
    diff = [k for k, s in shapes.items() if k in stored and stored[k] != tuple(s)]
    diff += [k for k in shapes if k not in stored and k not in meta.get("buffers", {})]
    if diff:
        raise CheckpointError(f"{meta['path']} was written for another model (differs at {', '.join(diff[:3])}); "
                              "resume from a checkpoint of this model or start fresh")


def _ranges(lengths: Sequence[int]) -> list[tuple[int, int]]:
    out, lo = [], 0
    for n in lengths:
        out.append((lo, lo + n))
        lo += n
    return out


def request(prefix: str, stored: Mapping[str, Any], dim: int | None, lengths: Sequence[int] | None,
            rank: int) -> tuple[dict[str, torch.Tensor], Any]:
    """The stored tensors rank ``rank`` needs for its slice (``dim``, ``lengths``; None: whole) of
    the tensor stored under ``prefix`` as ``stored`` = {"shape", "dim", "lengths"}, as empty
    tensors to load into, and a function that makes the slice from them once loaded."""
    shape = list(stored["shape"])
    old_dim, old_lengths = stored["dim"], stored["lengths"]
    dtype = getattr(torch, stored.get("dtype", "float32"))
    if old_dim is None:
        buf = {prefix: torch.empty(shape, dtype=dtype)}
        return buf, lambda: rank_slice(buf[prefix], dim, lengths, rank)
    spans = _ranges(old_lengths)
    want = None
    if dim == old_dim:
        want = _ranges(lengths)[rank]
    parts = [r for r, (lo, hi) in enumerate(spans) if hi > lo and (want is None or (lo < want[1] and hi > want[0]))]
    buf = {}
    for r in parts:
        s = list(shape)
        s[old_dim] = old_lengths[r]
        buf[f"{prefix}/{r}"] = torch.empty(s, dtype=dtype)

    def assemble() -> torch.Tensor:
        if not parts:
            s = list(shape)
            s[old_dim] = 0
            return torch.empty(s, dtype=dtype)
        region = torch.cat([buf[f"{prefix}/{r}"] for r in parts], dim=old_dim)
        if want is not None:
            return region.narrow(old_dim, want[0] - spans[parts[0]][0], want[1] - want[0])
        return rank_slice(region, dim, lengths, rank)

    return buf, assemble


def stored_keys(path: str, trust: bool = False) -> set[str]:
    """The names of the tensors a checkpoint holds."""
    check_trusted(path, trust)
    return set(_dcp().FileSystemReader(path).read_metadata().state_dict_metadata)


def load(path: str, tensors: dict[str, torch.Tensor], trust: bool = False) -> None:
    """Fill ``tensors`` (every rank its own keys; a rank that needs nothing still takes part in
    the collective load) from the DCP checkpoint at ``path`` (``check_trusted`` first). What DCP
    raises for a torn or corrupt checkpoint becomes a CheckpointError naming what could not be read."""
    from torch.distributed.checkpoint import CheckpointException

    check_trusted(path, trust)
    try:
        with _quiet_dcp():
            _dcp().load(tensors, checkpoint_id=path)
    except CheckpointException as e:  # a BaseException: DCP wraps each rank's error in it
        causes = [exc for exc, _ in e.failures.values()] or [e]
        raise CheckpointError(_torn_message(path, e.args[0], causes[0])) from None
    except (RuntimeError, ValueError, EOFError, OSError) as e:  # raised outside DCP's wrapping
        raise CheckpointError(_torn_message(path, "read", e)) from None


def _torn_message(step_dir: str, phase: str, cause: BaseException) -> str:
    if isinstance(cause, PermissionError):
        return (f"{cause.filename or step_dir} is not readable ({cause.strerror}); give yourself read access to "
                "the checkpoint, or use a copy you can read")
    what = str(cause).strip().splitlines()[0].split(". ")[0] if str(cause).strip() else ""
    what = f"{type(cause).__name__}: {what[:200]}" if what else type(cause).__name__
    # DCP's "plan" phase reads .metadata and matches it to the tensors hap.json's layout asks for;
    # its "read" phase reads the tensors from the .distcp files
    if phase != "plan":
        part = "its tensor data (.distcp) cannot be read"
    elif "metadata read failed" in str(cause):
        part = "its .metadata cannot be read"
    else:
        part = "its .metadata does not match its hap.json"
    return (f"{step_dir} is torn or corrupt: {part} ({what}). The run that wrote it may have died while "
            "writing, or a copy of it was cut short: use another of the run's step_* directories, give its "
            "--save directory to use the newest complete checkpoint, or copy it again")


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """Quiet what DCP says on the way: the warning that no process group exists (one process is a
    legitimate single-rank load) and the tracebacks it logs on the root logger while falling back
    from an unreadable .metadata (the error it raises says it once)."""
    import torch.distributed.checkpoint as dcp

    dcp_dir = os.path.dirname(dcp.__file__)

    def quiet(record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(dcp_dir)

    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    finally:
        root.removeFilter(quiet)




def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def rank_tensors(layout: Layout, params, buffers, opt, persistent: set[str],
                 elsewhere: frozenset[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's tensors for a checkpoint (its shards; replicated tensors under one key on
    every rank) and the record of how shards make whole tensors (``request`` reads it back).
    ``persistent``: the model's ``state_dict`` keys; a buffer outside it is saved for resuming
    but not exported (``load_state_dict`` would refuse it). ``elsewhere``: keys of parameters
    another pipeline stage writes (a weight several stages hold is written once, by the first);
    their shard names are each stage's own ranks, so one key is one stage's."""
    r = layout.rank
    tensors: dict[str, torch.Tensor] = {}
    stored, states, kept = {}, {}, {}
    for name, spec in layout.params.items():
        key, p = spec.keys[0], params[name].detach()
        if key in elsewhere:
            continue
        entry = {"shape": list(layout.shapes[key]), "dim": spec.dim,
                 "lengths": list(spec.lengths) if spec.lengths else None, "aliases": list(spec.keys),
                 "dtype": _dtype(p)}
        stored[key] = entry
        tensors[f"model/{key}" if not spec.sharded else f"model/{key}/{r}"] = p
        states[key] = {}
        for sname, v in opt.state.get(params[name], {}).items():
            if torch.is_tensor(v) and v.dim() and v.shape == p.shape:  # a moment: sharded like its parameter
                tensors[f"optim/{key}/{sname}" if not spec.sharded else f"optim/{key}/{sname}/{r}"] = v
                states[key][sname] = {**entry, "dtype": _dtype(v)}
            elif torch.is_tensor(v):  # a scalar such as Adam's step: the same on every rank
                tensors[f"optim/{key}/{sname}"] = v
                states[key][sname] = {"shape": list(v.shape), "dim": None, "lengths": None, "dtype": _dtype(v)}
    for name, key in layout.buffers.items():
        tensors[f"model/{key}"] = buffers[name]
        kept[key] = {"shape": list(buffers[name].shape), "dim": None, "lengths": None, "dtype": _dtype(buffers[name]),
                     "persistent": key in persistent}
    return tensors, {"layout": stored, "optimizer": states, "buffers": kept}


def restore(layout: Layout, meta: dict[str, Any], params, buffers, opt, trust: bool = False,
            with_optimizer: bool = True) -> None:
    """Load a checkpoint's tensors into this rank's shards under this layout (another plan's
    shards are read where they overlap this rank's slice); the optimizer's state too unless
    ``with_optimizer`` is False. ``trust``: see ``check_trusted``."""
    r = layout.rank
    by_alias = {alias: key for key, e in meta["layout"].items() for alias in e["aliases"]}
    wanted: dict[str, torch.Tensor] = {}
    fills = []  # (parameter name or None, optimizer state or buffer name, make)
    for name, spec in layout.params.items():
        key = by_alias[spec.keys[0]]
        buf, make = request(f"model/{key}", meta["layout"][key], spec.dim, spec.lengths, r)
        wanted.update(buf)
        fills.append((name, None, make))
        for sname, st in (meta["optimizer"].get(key, {}) if with_optimizer else {}).items():
            buf, make = request(f"optim/{key}/{sname}", st, spec.dim if st["dim"] is not None else None,
                                spec.lengths, r)
            wanted.update(buf)
            fills.append((name, sname, make))
    for name, key in layout.buffers.items():
        buf, make = request(f"model/{key}", meta["buffers"][key], None, None, r)
        wanted.update(buf)
        fills.append((None, name, make))
    load(meta["path"], wanted, trust)
    with torch.no_grad():
        for name, sname, make in fills:
            if name is None:
                buffers[sname].copy_(make())
            elif sname is None:
                params[name].copy_(make())
            else:
                opt.state[params[name]][sname] = make().clone().to(layout.device)
