"""Single-device training of a spec, the reference every distributed run is compared with: the
documented global batch order, ``model()`` (then a PRETRAINED directory's tensors), and the
optimizer flags of train.py, under torch.autocast for bf16 / fp16."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hap.spec import load_spec


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


def errors(got_losses: list[float], got: dict[str, torch.Tensor], want_losses: list[float],
           want: dict[str, torch.Tensor]) -> tuple[float, float, str | None]:
    """How far a run is from the reference: the largest relative loss error, the largest parameter
    error (max |a - b| / max |b| per tensor), and what makes them incomparable (a tensor of the
    reference missing, of another shape, or an integer buffer that differs), else None."""
    loss_err = max(abs(a - b) / (abs(b) + 1e-12) for a, b in zip(got_losses, want_losses))
    param_err = 0.0
    for k, w in want.items():
        if k not in got or got[k].shape != w.shape:
            return loss_err, param_err, f"{k}: missing or of another shape in the run's state"
        if w.is_floating_point():
            param_err = max(param_err, float((got[k].float() - w.float()).abs().max() / (w.float().abs().max() + 1e-6)))
        elif not torch.equal(got[k], w):
            return loss_err, param_err, f"{k} differs"
    return loss_err, param_err, None
