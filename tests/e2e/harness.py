"""End-to-end harness: plan a spec, emit train.py, run it under real torchrun (gloo), and
compare its losses and final parameters with single-device training of the same spec."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from hap.api import plan_spec
from hap.emit import emit_program
from hap.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
GLOO_TEARDOWN = "terminate called without an active exception"


def torchrun(nproc: int, script: Path, args: list[str], timeout: int = 300,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun; on a time-out the whole process group is killed, so no
    worker outlives the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           str(script), *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(f"torchrun timed out after {timeout}s:\n{out[-2000:]}\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def rank_outputs(source: str, tmp: Path, nproc: int = 2) -> list:
    """Run the script ``source`` on ``nproc`` ranks under torchrun; it writes its JSON result to
    ``sys.argv[1] + f".{rank}"``. Returns each rank's result."""
    script = tmp / "ranks.py"
    script.write_text(source)
    p = torchrun(nproc, script, [str(tmp / "out.json")])
    assert p.returncode == 0, p.stderr[-2000:]
    return [json.loads((tmp / f"out.json.{r}").read_text()) for r in range(nproc)]


def global_batches(spec, global_batch: int, seed: int = 0):
    """The documented global order: ``batch(step, B)``, or for a dataset spec epoch e's
    ``randperm(len, seed + e)``, step k of the epoch taking ``perm[k*B:(k+1)*B]`` (docs/data.md)."""
    if not hasattr(spec, "dataset"):
        step = 0
        while True:
            yield spec.batch(step, global_batch)
            step += 1
    ds = spec.dataset("train")
    collate = getattr(spec, "collate", torch.utils.data.default_collate)
    epoch = 0
    while True:
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + epoch))
        for k in range(len(ds) // global_batch):
            yield tuple(collate([ds[int(i)] for i in perm[k * global_batch:(k + 1) * global_batch]]))
        epoch += 1


def load_pretrained(model: torch.nn.Module, directory: str, prefix: str) -> None:
    """What PRETRAINED means on one device: every tensor of the checkpoint, read whole, loaded
    under ``prefix`` (the checkpoint must cover every parameter; tied weights are stored once)."""
    from safetensors.torch import load_file

    d = Path(directory)
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    got = {prefix + k: v for f in files for k, v in load_file(str(d / f)).items()}
    model.load_state_dict(got, strict=False)
    state = model.state_dict(keep_vars=True)
    loaded = {id(state[k]) for k in got if k in state}
    missing = [k for k, p in model.named_parameters() if id(p) not in loaded]
    assert not missing, f"PRETRAINED {d} lacks {missing[:3]}"


def reference(spec_path: str, steps: int, lr: float, global_batch: int, precision: str = "fp32",
              train: dict | None = None):
    """Single-device training of the spec: under torch.autocast for bf16 / fp16, with
    torch.amp.GradScaler's defaults for fp16; ``train`` holds the optimizer flags (optimizer,
    momentum, weight_decay, betas, clip, warmup, schedule, min_lr) as train.py documents them."""
    import math

    t = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "betas": (0.9, 0.999), "clip": None, "warmup": 0,
         "schedule": "constant", "min_lr": 0.0, **(train or {})}
    spec = load_spec(spec_path)
    torch.manual_seed(0)
    model = spec.model()
    if getattr(spec, "PRETRAINED", None):  # fine-tuning: model(), then the directory's tensors under the prefix
        load_pretrained(model, spec.PRETRAINED, getattr(spec, "PRETRAINED_PREFIX", ""))
    params = list(model.parameters())
    if t["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=t["momentum"], weight_decay=t["weight_decay"])
    else:
        cls = torch.optim.AdamW if t["optimizer"] == "adamw" else torch.optim.Adam
        opt = cls(params, lr=lr, betas=t["betas"], weight_decay=t["weight_decay"])

    def lr_at(s: int) -> float:
        w = t["warmup"]
        if s < w:
            return lr * (s + 1) / w
        if t["schedule"] == "cosine":
            return t["min_lr"] + (lr - t["min_lr"]) * 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, steps - w)))
        return lr

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    losses = []
    data = global_batches(spec, global_batch)
    for step in range(steps):
        with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
            loss = model(*next(data))
        losses.append(float(loss.detach()))
        opt.zero_grad()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if t["clip"]:
            torch.nn.utils.clip_grad_norm_(params, t["clip"])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def plan_for(spec_path: str, cluster: str, pins: dict[str, str] | None = None, precision: str = "fp32",
             grad_reduce: str = "fp32", recompute: str = "auto", experts: str = "auto"):
    return plan_spec(spec_path, cluster, pins=pins, precision=precision, grad_reduce=grad_reduce, recompute=recompute,
                     experts=experts)


def run_exact(spec_path: str, cluster: str, tmp: Path, steps: int = 3, lr: float = 0.05,
              pins: dict[str, str] | None = None, precision: str = "fp32", grad_reduce: str = "fp32",
              train: dict | None = None, train_args: list[str] = (), recompute: str = "auto",
              experts: str = "auto"):
    """Returns (plan, max relative loss error, max relative parameter error); the run's
    --log-json is at tmp/log.json."""
    plan = plan_for(spec_path, cluster, pins, precision, grad_reduce, recompute, experts)
    emit_program(plan, tmp / "out", spec=spec_path)
    log, dump = tmp / "log.json", tmp / "params.pt"
    p = torchrun(plan.num_ranks, tmp / "out" / "train.py",
                 ["--steps", str(steps), "--lr", str(lr), "--log-json", str(log), "--dump-params", str(dump),
                  *train_args])
    assert p.returncode == 0, f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert GLOO_TEARDOWN not in p.stderr
    got_losses = json.loads(log.read_text())["losses"]
    got = torch.load(dump, weights_only=True)
    want_losses, want = reference(spec_path, steps, lr, plan.global_batch, precision, train)
    assert len(got_losses) == steps
    loss_err = max(abs(a - b) / (abs(b) + 1e-12) for a, b in zip(got_losses, want_losses))
    assert set(got) == set(want), f"state_dict keys differ: {set(got) ^ set(want)}"
    param_err = 0.0
    for k, w in want.items():
        assert got[k].shape == w.shape, k
        if w.is_floating_point():
            param_err = max(param_err, float((got[k] - w).abs().max() / (w.abs().max() + 1e-6)))
        else:
            assert torch.equal(got[k], w), k
    return plan, loss_err, param_err
