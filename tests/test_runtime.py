"""hap.runtime: uneven differentiable collectives, sync batch norm, grads, emulation.

Multi-process checks run in 2 and 3 spawned gloo processes (one spawn per world size, all checks in
it; each check records its mismatches instead of raising, so the ranks stay in step). Each check
compares the forward with the value computed on the full tensor and every rank's gradient with the
single-process autograd reference of the whole SPMD computation.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

import hap.runtime as hr
from hap.runtime import emulate
from tests.helpers import free_port

FORMS = ("padded", "grouped")
LENGTH_SETS = {2: [(1, 4), (0, 3)], 3: [(5, 0, 3), (0, 0, 4), (2, 2, 2)]}


# ----------------------------------------------------------------------------------------------
# helpers shared by worker checks
# ----------------------------------------------------------------------------------------------

def _rand(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous (reversed-strides) layout."""
    perm = tuple(reversed(range(t.dim())))
    return t.permute(perm).contiguous().permute(perm)


def _off(ls, i):
    return sum(ls[:i])


class _Errs:
    def __init__(self):
        self.msgs: list[str] = []

    def close(self, label, got, want, atol=1e-9, rtol=1e-7):
        if got is None or want is None:
            if got is not want:
                self.msgs.append(f"{label}: one of got/want is None ({got is None}, {want is None})")
            return
        if tuple(got.shape) != tuple(want.shape):
            self.msgs.append(f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        if got.dtype != want.dtype:
            self.msgs.append(f"{label}: dtype {got.dtype} != {want.dtype}")
            return
        if got.is_floating_point():
            ok = torch.allclose(got, want, atol=atol, rtol=rtol)
        else:
            ok = torch.equal(got, want)
        if not ok:
            err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
            self.msgs.append(f"{label}: values differ (max abs err {err:.3g})")


def _raw_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _local(kind, X, adds, r, dim, ls):
    if kind == "R":
        return X
    if kind == "P":
        return adds[r]
    return X.narrow(dim, _off(ls, r), ls[r])


def _check_collective(errs, label, fn, shape, in_kind, in_dim, in_ls, out_kind, out_dim, out_ls, n, r,
                      seed=0):
    """Run `fn(local_x)` (identity on the global value) and check forward + gradient."""
    adds = [_noncontig(_rand(shape, seed + 10 + i)) for i in range(n)]
    X = sum(adds) if in_kind == "P" else _noncontig(_rand(shape, seed))
    Ws = [_rand(shape, seed + 100 + i) for i in range(n)]

    x = _local(in_kind, X, adds, r, in_dim, in_ls).detach().requires_grad_()
    y = fn(x)
    if out_kind == "R":
        errs.close(f"{label} forward", y.detach(), X)
        loss = (y * Ws[r]).sum()
    elif out_kind == "S":
        errs.close(f"{label} forward", y.detach(), X.narrow(out_dim, _off(out_ls, r), out_ls[r]))
        loss = (y * Ws[r].narrow(out_dim, _off(out_ls, r), out_ls[r])).sum()
    else:  # P
        errs.close(f"{label} forward (sum of partials)", _raw_sum(y), X)
        loss = (y * Ws[0]).sum()
    loss.backward()

    Xr = X.detach().clone().requires_grad_()
    if out_kind == "R":
        ref = sum((Xr * Ws[i]).sum() for i in range(n))
    elif out_kind == "S":
        ref = sum((Xr.narrow(out_dim, _off(out_ls, i), out_ls[i])
                   * Ws[i].narrow(out_dim, _off(out_ls, i), out_ls[i])).sum() for i in range(n))
    else:
        ref = (Xr * Ws[0]).sum()
    ref.backward()
    G = Xr.grad
    gx = x.grad if x.grad is not None else torch.zeros_like(x)
    if in_kind == "S":
        errs.close(f"{label} grad", gx, G.narrow(in_dim, _off(in_ls, r), in_ls[r]))
    elif in_kind == "P":
        errs.close(f"{label} grad", gx, G)
    else:
        errs.close(f"{label} grad (sum over ranks)", _raw_sum(gx), G)


# ----------------------------------------------------------------------------------------------
# checks (each returns a list of mismatch messages; all ranks run the same collectives)
# ----------------------------------------------------------------------------------------------

def _ck_all_gather(n, r):
    errs = _Errs()
    for ls in LENGTH_SETS[n]:
        N = sum(ls)
        for form in FORMS:
            for dim, shape in ((0, (N, 3, 2)), (1, (3, N, 2)), (-1, (3, 2, N))):
                _check_collective(errs, f"all_gather {ls} {form} dim={dim}",
                                  lambda x, d=dim, f=form, ls=ls: hr.all_gather(x, d, ls, f),
                                  shape, "S", dim, ls, "R", None, None, n, r)
            # integer forward
            full = torch.arange(N * 3, dtype=torch.long).reshape(3, N)
            got = hr.all_gather(full.narrow(1, _off(ls, r), ls[r]), 1, ls, form)
            errs.close(f"all_gather int {ls} {form}", got, full)
            # float32 path
            full32 = _rand((N, 4), 5, torch.float32)
            got = hr.all_gather(full32.narrow(0, _off(ls, r), ls[r]), 0, ls, form)
            errs.close(f"all_gather f32 {ls} {form}", got, full32)
    return errs.msgs


def _ck_reduce_scatter(n, r):
    errs = _Errs()
    for ls in LENGTH_SETS[n]:
        N = sum(ls)
        for form in FORMS:
            for dim, shape in ((0, (N, 3, 2)), (1, (3, N, 2)), (-1, (3, 2, N))):
                _check_collective(errs, f"reduce_scatter {ls} {form} dim={dim}",
                                  lambda x, d=dim, f=form, ls=ls: hr.reduce_scatter(x, d, ls, f),
                                  shape, "P", None, None, "S", dim, ls, n, r)
    return errs.msgs


def _ck_all_reduce(n, r):
    errs = _Errs()
    _check_collective(errs, "all_reduce", hr.all_reduce, (4, 3), "P", None, None, "R", None, None, n, r)
    _check_collective(errs, "all_reduce 1d", hr.all_reduce, (7,), "P", None, None, "R", None, None, n, r, 3)
    return errs.msgs


def _ck_all_to_all(n, r):
    errs = _Errs()
    sets = LENGTH_SETS[n]
    for ls in sets:
        N = sum(ls)
        for form in FORMS:
            # S(0) -> S(1), dim 1 split by the same or other lengths
            for ls2 in sets:
                M = sum(ls2)
                _check_collective(errs, f"all_to_all {ls}@0->{ls2}@1 {form}",
                                  lambda x, f=form, a=ls, b=ls2: hr.all_to_all(x, 0, a, 1, b, f),
                                  (N, M, 2), "S", 0, ls, "S", 1, ls2, n, r)
                _check_collective(errs, f"all_to_all {ls}@-1->{ls2}@0 {form}",
                                  lambda x, f=form, a=ls, b=ls2: hr.all_to_all(x, -1, a, 0, b, f),
                                  (M, 3, N), "S", 2, ls, "S", 0, ls2, n, r)
            # re-split of the same dim
            for ls2 in (tuple(reversed(ls)), ls, (N,) + (0,) * (n - 1)):
                _check_collective(errs, f"all_to_all resplit {ls}->{ls2} dim1 {form}",
                                  lambda x, f=form, a=ls, b=ls2: hr.all_to_all(x, 1, a, 1, b, f),
                                  (2, N, 3), "S", 1, ls, "S", 1, ls2, n, r)
            # integer forward
            full = torch.arange(N * 6, dtype=torch.int32).reshape(N, 6)
            d6 = (6,) + (0,) * (n - 1) if n > 2 else (2, 4)
            got = hr.all_to_all(full.narrow(0, _off(ls, r), ls[r]), 0, ls, 1, d6, form)
            errs.close(f"all_to_all int {ls} {form}", got, full.narrow(1, _off(d6, r), d6[r]))
    return errs.msgs


def _ck_slice_partial(n, r):
    errs = _Errs()
    for ls in LENGTH_SETS[n]:
        N = sum(ls)
        _check_collective(errs, f"slice_local {ls}", lambda x, ls=ls: hr.slice_local(x, 1, ls),
                          (3, N), "R", None, None, "S", 1, ls, n, r)
        _check_collective(errs, f"slice_local {ls} dim -2", lambda x, ls=ls: hr.slice_local(x, -2, ls),
                          (N, 2), "R", None, None, "S", 0, ls, n, r)
    _check_collective(errs, "to_partial", hr.to_partial, (4, 2), "R", None, None, "P", None, None, n, r)
    # round trip R -> P -> R and R -> S -> R
    x = _rand((5, 3), 9).requires_grad_()
    y = hr.all_reduce(hr.to_partial(x))
    errs.close("to_partial+all_reduce", y.detach(), x.detach())
    return errs.msgs


def _ck_misc(n, r):
    errs = _Errs()
    s = hr.sum_scalar(r + 1)
    if s != n * (n + 1) / 2:
        errs.msgs.append(f"sum_scalar: {s}")
    s = hr.sum_scalar(torch.tensor(0.5 * (r + 1)))
    if abs(s - n * (n + 1) / 4) > 1e-12:
        errs.msgs.append(f"sum_scalar tensor: {s}")
    t = torch.full((3, 2), float(r))
    hr.broadcast_(t, src=n - 1)
    errs.close("broadcast_", t, torch.full((3, 2), float(n - 1)))
    tnc = torch.full((2, 3), float(r)).t()
    hr.broadcast_(tnc, src=0)
    errs.close("broadcast_ non-contiguous", tnc, torch.zeros(3, 2))
    for ls in LENGTH_SETS[n]:
        N = sum(ls)
        full = _rand((2, N), 4)
        errs.close(f"gather_full S {ls}", hr.gather_full(full.narrow(1, _off(ls, r), ls[r]), "S", 1, ls), full)
    adds = [_rand((3,), 20 + i) for i in range(n)]
    errs.close("gather_full P", hr.gather_full(adds[r], "P", 0, ()), sum(adds))
    errs.close("gather_full R", hr.gather_full(adds[0], "R", 0, ()), adds[0])
    # lengths that do not match the world size are a clear error
    try:
        hr.all_gather(torch.zeros(1), 0, (1,) * (n + 1))
        errs.msgs.append("wrong-length lengths not rejected")
    except ValueError as e:
        if "world size" not in str(e):
            errs.msgs.append(f"unclear message: {e}")
    return errs.msgs


def _ck_grad_sync_buckets(n, r):
    """GradSync without overlap: a tied parameter listed twice is reduced once, a None gradient is
    this rank's zero addend, an f64 parameter gets a bucket of its own dtype, the loss rides along,
    and each bucket's buffer persists from step to step."""
    errs = _Errs()
    a = torch.zeros(3, 4, requires_grad=True)
    b = torch.zeros(5, requires_grad=True)
    c = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    d = torch.zeros(6, requires_grad=True)  # grad None on rank 0
    a.grad = torch.full((3, 4), float(r + 1))
    b.grad = torch.arange(5.0) * (r + 1)
    c.grad = torch.full((2, 2), 0.5 * r, dtype=torch.float64)
    if r != 0:
        d.grad = torch.ones(6)
    sync = hr.GradSync([[a, b], [c, d, a]], overlap=False)
    total = sync.finish(torch.tensor(0.25 * (r + 1)))
    tot = n * (n + 1) / 2
    errs.close("grad sync a", a.grad, torch.full((3, 4), tot))
    errs.close("grad sync b", b.grad, torch.arange(5.0) * tot)
    errs.close("grad sync c (f64)", c.grad, torch.full((2, 2), 0.5 * (n - 1) * n / 2, dtype=torch.float64))
    errs.close("grad sync d (None on rank 0)", d.grad, torch.full((6,), float(n - 1)))
    if abs(total - 0.25 * tot) > 1e-6:
        errs.msgs.append(f"grad sync loss: {total} != {0.25 * tot}")
    if c.grad.dtype != torch.float64:
        errs.msgs.append(f"grad sync turned the f64 gradient into {c.grad.dtype}")
    kept = a.grad  # held, so a fresh buffer could not land at the same address
    first = kept.untyped_storage().data_ptr()
    a.grad = torch.full((3, 4), 1.0)  # a new step's gradient: reduced in the same, persistent buffer
    sync.finish(torch.tensor(0.0))
    if a.grad.untyped_storage().data_ptr() != first:
        errs.msgs.append("grad sync allocated a new bucket buffer for the same bucket")
    errs.close("grad sync persistent bucket", a.grad, torch.full((3, 4), float(n)))
    sync.finish(torch.tensor(0.0))  # the same buckets again, without a new backward: grads view the buffer
    errs.close("grad sync twice", a.grad, torch.full((3, 4), float(n * n)))
    total = hr.GradSync([], overlap=False).finish(torch.tensor(float(r)))  # no replicated params
    if abs(total - (n - 1) * n / 2) > 1e-9:
        errs.msgs.append(f"grad sync loss without params: {total}")
    return errs.msgs


def _ck_sync_batch_norm(n, r):
    errs = _Errs()
    for ls in LENGTH_SETS[n]:
        N = sum(ls)
        for shape, affine in (((N, 3, 4), True), ((N, 3), False), ((N, 2, 3, 2), True)):
            C = shape[1]
            X = _rand(shape, 1, torch.float32) * 3 + 1
            W = _rand(shape, 2, torch.float32)
            w0 = _rand((C,), 3, torch.float32) if affine else None
            b0 = _rand((C,), 4, torch.float32) if affine else None
            rm0, rv0 = _rand((C,), 5, torch.float32), _rand((C,), 6, torch.float32).abs() + 0.5

            x = X.narrow(0, _off(ls, r), ls[r]).clone().requires_grad_()
            w = w0.clone().requires_grad_() if affine else None
            b = b0.clone().requires_grad_() if affine else None
            rm, rv = rm0.clone(), rv0.clone()
            y = hr.sync_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, ls)
            (y * W.narrow(0, _off(ls, r), ls[r])).sum().backward()

            Xr = X.clone().requires_grad_()
            wr = w0.clone().requires_grad_() if affine else None
            br = b0.clone().requires_grad_() if affine else None
            rmr, rvr = rm0.clone(), rv0.clone()
            Y = F.batch_norm(Xr, rmr, rvr, wr, br, True, 0.1, 1e-5)
            (Y * W).sum().backward()
            lab = f"sync_batch_norm {ls} {shape}"
            tol = {"atol": 1e-5, "rtol": 1e-5}
            errs.close(f"{lab} out", y.detach(), Y.detach().narrow(0, _off(ls, r), ls[r]), **tol)
            gx = x.grad if x.grad is not None else torch.zeros_like(x)
            errs.close(f"{lab} grad x", gx, Xr.grad.narrow(0, _off(ls, r), ls[r]), **tol)
            if affine:
                errs.close(f"{lab} grad w", _raw_sum(w.grad), wr.grad, atol=1e-4, rtol=1e-5)
                errs.close(f"{lab} grad b", _raw_sum(b.grad), br.grad, atol=1e-4, rtol=1e-5)
            errs.close(f"{lab} running_mean", rm, rmr, **tol)
            errs.close(f"{lab} running_var", rv, rvr, **tol)
            # eval mode: running stats, no communication
            ye = hr.sync_batch_norm(x.detach(), w0, b0, rm, rv, False, 0.1, 1e-5, ls)
            Ye = F.batch_norm(X, rmr, rvr, w0, b0, False, 0.1, 1e-5)
            errs.close(f"{lab} eval", ye, Ye.narrow(0, _off(ls, r), ls[r]), **tol)
    return errs.msgs


def _busy(seconds):
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        pass


def _ck_emulation(n, r):
    """Rank n-1 emulates a 3x slower device: the others wait ~2x its 20 ms compute at the collective."""
    errs = _Errs()
    x = torch.ones(4)
    hr.all_reduce(x)  # align the ranks
    if r == n - 1:
        hr.set_emulation(3.0)
    s0 = emulate.total_sleep()
    _busy(0.02)
    t0 = time.perf_counter()
    hr.all_reduce(x)
    waited = time.perf_counter() - t0
    slept = emulate.total_sleep() - s0
    hr.end_segment()
    hr.set_emulation(1.0)
    if r == n - 1:
        if not 0.035 <= slept <= 0.4:
            errs.msgs.append(f"emulated rank slept {slept:.3f}s for ~0.02s of compute at slowdown 3")
    elif not 0.025 <= waited <= 1.0:
        errs.msgs.append(f"rank {r} waited {waited:.3f}s at the collective, expected ~0.04s")
    return errs.msgs


def _ck_grad_sync(n, r):
    """Buckets all-reduced during backward (overlap) and after it give the summed gradients and the
    global loss, two steps in a row; a parameter this rank never used contributes zeros."""
    errs = _Errs()
    for overlap in (True, False):
        torch.manual_seed(0)
        layers = [torch.nn.Linear(8, 8) for _ in range(3)]
        unused = torch.nn.Parameter(torch.ones(5))
        params = [p for m in layers for p in m.parameters()]
        # backward completes the last layer first: the plan's bucket order
        buckets = [list(layers[2].parameters()), list(layers[1].parameters()) + [unused],
                   list(layers[0].parameters())]
        sync = hr.GradSync(buckets, overlap=overlap)
        for step in range(2):
            for p in params + [unused]:
                p.grad = None
            x = torch.full((4, 8), float(r + 1 + step))
            y = x
            for m in layers:
                y = torch.relu(m(y))
            loss = y.sum() * (r + 1)
            loss.backward()
            want = {}
            for i in range(n):  # what the sum over ranks must be: recompute every rank's grads here
                xi = torch.full((4, 8), float(i + 1 + step))
                yi = xi
                for m in layers:
                    yi = torch.relu(torch.nn.functional.linear(yi, m.weight.detach(), m.bias.detach()))
                want_loss = float(yi.sum()) * (i + 1)
                want[i] = want_loss
            got = sync.finish(loss)
            if abs(got - sum(want.values())) > 1e-3 * abs(sum(want.values())):
                errs.msgs.append(f"overlap={overlap} step {step}: loss {got} != {sum(want.values())}")
            ref = [torch.zeros_like(p) for p in params]
            for i in range(n):
                xi = torch.full((4, 8), float(i + 1 + step))
                ws = [p.detach().clone().requires_grad_(True) for p in params]
                yi = xi
                for k in range(3):
                    yi = torch.relu(torch.nn.functional.linear(yi, ws[2 * k], ws[2 * k + 1]))
                (yi.sum() * (i + 1)).backward()
                for a, w in zip(ref, ws):
                    a += w.grad
            for k, (p, want_g) in enumerate(zip(params, ref)):
                errs.close(f"grad_sync overlap={overlap} step {step} param {k}", p.grad, want_g, atol=1e-5, rtol=1e-6)
            errs.close(f"grad_sync overlap={overlap} unused", unused.grad, torch.zeros(5))
    return errs.msgs


CHECKS = {
    "grad_sync": _ck_grad_sync,
    "all_gather": _ck_all_gather,
    "reduce_scatter": _ck_reduce_scatter,
    "all_reduce": _ck_all_reduce,
    "all_to_all": _ck_all_to_all,
    "slice_local_to_partial": _ck_slice_partial,
    "misc": _ck_misc,
    "grad_sync_buckets": _ck_grad_sync_buckets,
    "sync_batch_norm": _ck_sync_batch_norm,
    "emulation": _ck_emulation,
}


def _worker(rank, world, store_path, port, out_dir):
    import torch.distributed as dist

    os.environ.pop("LOCAL_RANK", None)
    if port is not None:  # the torchrun way: env:// rendezvous done by hr.init
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:  # a process group made by someone else is adopted
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
    results = {}
    try:
        got = hr.init("gloo")
        results["init"] = [] if got == (rank, world) else [f"init returned {got}"]
        if hr.rank() != rank or hr.world_size() != world or hr.device() != torch.device("cpu"):
            results["init"].append("rank()/world_size()/device() wrong")
        for name, fn in CHECKS.items():
            try:
                results[name] = fn(world, rank)
            except Exception:  # noqa: BLE001 - reported to the parent test
                results[name] = [traceback.format_exc()]
    finally:
        hr.shutdown()
        hr.shutdown()  # twice is fine
        if dist.is_initialized():  # adopted group: ours to destroy
            dist.destroy_process_group()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


def _run_world(world, use_env):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port() if use_env else None
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "store"), port, tmp))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.time() + 120
        for p in procs:
            p.join(max(1.0, deadline - time.time()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        out = {}
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.json")
            if not os.path.exists(path):
                pytest.fail(f"rank {r} of {world} wrote no results (exit code {procs[r].exitcode})")
            with open(path) as f:
                out[r] = json.load(f)
        return out


@pytest.fixture(scope="module")
def world2():
    return _run_world(2, use_env=True)


@pytest.fixture(scope="module")
def world3():
    return _run_world(3, use_env=False)


@pytest.mark.parametrize("check", ["init", *CHECKS])
@pytest.mark.parametrize("world", [2, 3])
def test_multiprocess(check, world, request):
    res = request.getfixturevalue(f"world{world}")
    msgs = [f"rank {r}: {m}" for r in sorted(res) for m in res[r].get(check, ["check did not run"])]
    assert not msgs, "\n".join(msgs)


# ----------------------------------------------------------------------------------------------
# single-process mode (no WORLD_SIZE): every op is the identity / local
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def single(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert hr.init("gloo") == (0, 1)
    yield
    hr.set_emulation(1.0)
    hr.shutdown()


def test_single_process_identity(single):
    assert hr.rank() == 0 and hr.world_size() == 1 and not hr.is_distributed()
    x = torch.randn(4, 3, requires_grad=True)
    for form in FORMS:
        assert torch.equal(hr.all_gather(x, 0, (4,), form), x)
        assert torch.equal(hr.reduce_scatter(x, -1, (3,), form), x)
        assert torch.equal(hr.all_to_all(x, 0, (4,), 1, (3,), form), x)
    assert torch.equal(hr.all_reduce(x), x)
    assert torch.equal(hr.to_partial(x), x)
    s = hr.slice_local(x, 1, (3,))
    assert torch.equal(s, x) and s.data_ptr() != x.data_ptr()
    assert hr.sum_scalar(2.5) == 2.5 and hr.sum_scalar(torch.tensor(1.5)) == 1.5
    assert torch.equal(hr.gather_full(x, "S", 0, (4,)), x)
    assert torch.equal(hr.gather_full(x, "P", 0, ()), x)
    t = torch.ones(2)
    hr.broadcast_(t)
    assert torch.equal(t, torch.ones(2))
    (hr.all_gather(x, 0, (4,)) * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((4, 3), 2.0))
    with pytest.raises(ValueError, match="world size"):
        hr.all_gather(x, 0, (2, 2))
    with pytest.raises(ValueError, match="form"):
        hr.all_gather(x, 0, (4,), "zigzag")


def test_emulation_busy_waits_and_skips_undilated_work():
    """The slow rank's extra time is spent busy (CPU time, not a sleep), and what runs inside
    hr.undilated() (batch loading, the optimizer step) is not dilated."""
    hr.set_emulation(3.0)
    try:
        with hr.undilated():
            _busy(0.02)
        s0, c0 = emulate.total_sleep(), time.thread_time()
        hr.end_segment()  # nothing computed since the undilated block: nothing to add
        assert emulate.total_sleep() - s0 < 0.005
        _busy(0.02)
        s0, c0 = emulate.total_sleep(), time.thread_time()
        hr.end_segment()
        extra = emulate.total_sleep() - s0
        assert 0.035 <= extra <= 0.4  # 2 x the ~20 ms segment
        assert time.thread_time() - c0 >= 0.5 * extra  # busy: this thread's CPU time grew with it
    finally:
        hr.set_emulation(1.0)


def test_single_process_grads_and_bn(single):
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    a.grad = torch.ones(3)
    assert hr.GradSync([[a, b]], overlap=False).finish(torch.tensor(1.5)) == 1.5
    assert torch.equal(a.grad, torch.ones(3)) and torch.equal(b.grad, torch.zeros(2))
    x = torch.randn(6, 3, 2)
    w, bb = torch.randn(3), torch.randn(3)
    rm, rv, rm2, rv2 = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    y = hr.sync_batch_norm(x, w, bb, rm, rv, True, 0.1, 1e-5, (6,))
    assert torch.allclose(y, F.batch_norm(x, rm2, rv2, w, bb, True, 0.1, 1e-5), atol=1e-6)
    assert torch.allclose(rm, rm2) and torch.allclose(rv, rv2)
    hr.shutdown()
    hr.shutdown()


def test_single_process_emulation(single):
    hr.set_emulation(3.0)
    x = torch.ones(2)
    s0 = emulate.total_sleep()
    _busy(0.02)
    t0 = time.perf_counter()
    hr.all_reduce(x)  # identity here, but still a segment boundary
    dt = time.perf_counter() - t0
    slept = emulate.total_sleep() - s0
    assert 0.035 <= slept <= 0.4, slept  # ~2 x 20 ms
    assert dt >= 0.9 * slept
    # the sleep itself is not compute: an immediate end_segment adds (almost) nothing
    s1 = emulate.total_sleep()
    hr.end_segment()
    assert emulate.total_sleep() - s1 < 0.01
    # end_segment flushes a pending segment
    _busy(0.01)
    s2 = emulate.total_sleep()
    hr.end_segment()
    assert 0.015 <= emulate.total_sleep() - s2 <= 0.3
    hr.set_emulation(1.0)
    s3 = emulate.total_sleep()
    _busy(0.01)
    hr.end_segment()
    assert emulate.total_sleep() == s3
    with pytest.raises(ValueError):
        hr.set_emulation(0.5)
    assert math.isclose(emulate.slowdown(), 1.0)


def test_collectives_inside_undilated_dilate_nothing():
    """The gradient buckets' all-reduce runs inside hr.undilated() (as hapcheck's baseline does not
    slow its gradient cat): a collective there must not dilate the segment before the block again."""
    hr.set_emulation(3.0)
    try:
        hr.end_segment()
        _busy(0.02)
        s0 = emulate.total_sleep()
        with hr.undilated():
            first = emulate.total_sleep() - s0  # the segment before the block: dilated once
            _busy(0.01)
            emulate.before_comm()  # what a collective's primitive does
            emulate.after_comm()
            inside = emulate.total_sleep() - s0 - first
        assert 0.035 <= first <= 0.4
        assert inside == 0.0
    finally:
        hr.set_emulation(1.0)


def test_local_work_only_runs_the_local_half_of_collectives():
    """The planner's timing mode: rank 1 of 2 packs and unpacks as in a run, nothing is sent, and
    the process is single again afterwards."""
    from hap.runtime import dist as hd

    x = torch.randn(4, 6, requires_grad=True)
    with hd.local_work_only(1, 2):
        assert hr.is_distributed() and hr.rank() == 1
        out = hr.all_gather(x, 1, (2, 6), form="grouped")  # rank 1 holds 6 of 8 columns
        assert out.shape == (4, 8)
        out.sum().backward()  # reduce-scatter back: rank 1's 6 columns
        assert x.grad.shape == x.shape
        assert hr.reduce_scatter(torch.ones(4, 8), 0, (1, 3)).shape == (3, 8)
    assert not hr.is_distributed() and hr.rank() == 0
    with hd.local_work_only(0, 2), pytest.raises(RuntimeError, match="process group is active"):
        with hd.local_work_only(0, 2):
            pass
    assert not hr.is_distributed()


def test_host_allocator_keeps_freed_memory(monkeypatch):
    from hap.runtime import host_memory

    monkeypatch.setattr(host_memory, "_done", None)
    monkeypatch.setenv("HAP_KEEP_HOST_MEMORY", "0")
    assert host_memory.keep_freed_memory() is False
    monkeypatch.setattr(host_memory, "_done", None)
    monkeypatch.delenv("HAP_KEEP_HOST_MEMORY")
    import platform

    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert host_memory.keep_freed_memory() is True
        assert host_memory.keep_freed_memory() is True  # once per process


def test_two_nodes_on_one_machine_write_their_initial_state_to_different_directories(monkeypatch):
    # a static rendezvous names every job "none"; hap-emulate's nodes (and two agents on one host)
    # share /tmp: one node's first rank replaced the other's directory while it was renamed
    from hap.runtime.initial import node_directory

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("MASTER_PORT", "29500")
    seen = set()
    for node in ("0", "1"):
        monkeypatch.setenv("GROUP_RANK", node)
        seen.add(node_directory(0))
    monkeypatch.setenv("MASTER_PORT", "29501")  # another job at the same time
    seen.add(node_directory(0))
    assert len(seen) == 3


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_takes_torchs_fused_step_and_steps_as_the_unfused_one(name):
    import argparse

    from hap.runtime import optim

    args = argparse.Namespace(optimizer=name, lr=1e-2, momentum=0.0, weight_decay=0.1, betas="0.9,0.999",
                              no_decay_norms_biases=False)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = optim.build(args, {"w": w}, {"w": 2})
    assert opt.defaults["fused"] is True
    twin = torch.nn.Parameter(w.detach().clone())
    plain = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)([twin], lr=1e-2, weight_decay=0.1,
                                                                           foreach=False)
    for step in range(3):
        g = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        w.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        plain.step()
    assert torch.allclose(w, twin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep", [False, True])
def test_a_kept_block_runs_once_and_starts_its_gathers_again_where_backward_would_recompute_it(keep, monkeypatch):
    # a rank that recomputes a block runs its forward again in backward; a rank that keeps it
    # runs it once, and starts the block's weight gathers again (recorded in forward) at
    # backward's first use of the block's saved tensors: where the other ranks recompute it
    from hap.runtime import prefetch

    again = []
    monkeypatch.setattr(prefetch, "start_again", lambda specs: again.append(list(specs)))
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    w = torch.randn(4, 4, requires_grad=True)
    runs = []

    def block():
        runs.append(1)
        gathers = hr.Prefetch([(w, 0, [4], "padded", None)])
        return torch.tanh(x @ gathers.take(0)),

    y, = hr.recompute(block, keep=keep)
    assert len(runs) == 1 and again == []
    y.sum().backward()
    want = torch.autograd.grad(torch.tanh(x @ w).sum(), w)[0]
    assert torch.equal(w.grad, want)
    assert len(runs) == (1 if keep else 2)
    assert [[spec[0] is w for spec in specs] for specs in again] == ([[True]] if keep else [])
