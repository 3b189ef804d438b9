"""What users run instead of hap, as a torchrun program: torch's DistributedDataParallel on given
batch shares, or FSDP2 (``fully_shard``), with the same spec, data, optimizer and precision as
an emitted train.py.

    torchrun --nproc-per-node 2 -m hap.bench.torch_baseline --spec examples/mlp.py --strategy ddp \\
        --global-batch 1024 --shares 512,512 --steps 12 --precision bf16 --log-json ddp.json

Each rank trains ``spec.batch(step, B)``'s rows of its share, under autocast for bf16 / fp16, with
SGD. Uneven shares scale each rank's loss by ``n x share / B``, so DDP's gradient average is the
global batch's mean. ``HAP_EMULATE_SLOWDOWN`` (the slowdowns by rank, comma-separated, as
hap-emulate sets it) makes a rank that much slower, as an emitted train.py's ``--emulate`` does:
the compute since the rank's last communication is dilated before the next one starts (DDP:
a comm hook before each bucket's all-reduce; FSDP2: after each sharded module's forward and
backward, so ops outside those modules are not dilated, which favours FSDP2). The process joins
and leaves its group through ``hap.runtime`` as train.py does (its host-memory setting and its
teardown, which gloo needs: destroying a group as a peer does aborted one rank in a test run).
Rank 0 writes the step times (and losses) to ``--log-json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist


class Dilation:
    """A device ``factor`` times slower: the compute since ``mark()`` lasts ``factor`` x as long."""

    def __init__(self, factor: float) -> None:
        self.factor, self.since = factor, time.perf_counter()

    def mark(self, *_: object) -> None:
        self.since = time.perf_counter()

    def dilate(self, *_: object) -> None:
        if self.factor > 1.0:
            end = time.perf_counter() + (self.factor - 1.0) * (time.perf_counter() - self.since)
            while time.perf_counter() < end:  # busy, as a slower device would be
                pass
        self.mark()


def wrap_ddp(model: torch.nn.Module, slow: Dilation, n: int) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)

    def hook(state, bucket):  # unannotated: DDP checks a hook's annotations, which postponed evaluation hides
        slow.dilate()
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(n))

    ddp.register_comm_hook(None, hook)
    return ddp


def wrap_fsdp2(model: torch.nn.Module, slow: Dilation) -> torch.nn.Module:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # torch < 2.6
        raise SystemExit(f"FSDP2 needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}") from None
    # modules holding parameters, those that share one (tied embeddings) in one FSDP group
    groups: list[list[torch.nn.Module]] = []
    owner: dict[int, list[torch.nn.Module]] = {}
    for m in model.modules():
        own = [id(p) for p in m.parameters(recurse=False)]
        if m is model or not own:
            continue
        shared = next((owner[i] for i in own if i in owner), None)
        if shared is None:
            shared = []
            groups.append(shared)
        shared.append(m)
        owner.update(dict.fromkeys(own, shared))
    for group in groups:
        fully_shard(group if len(group) > 1 else group[0])
        for m in group:  # after fully_shard's hooks: the all-gather is done when the compute starts
            m.register_forward_pre_hook(slow.mark)
            m.register_forward_hook(slow.dilate)
            m.register_full_backward_pre_hook(slow.mark)
            m.register_full_backward_hook(slow.dilate)
    fully_shard(model)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hap.bench.torch_baseline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    ap.add_argument("--global-batch", type=int, required=True)
    ap.add_argument("--shares", required=True, help="samples per rank, comma-separated (sum: the global batch)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--log-json", required=True)
    args = ap.parse_args(argv)
    import hap.runtime as hr
    from hap.spec import load_spec

    spec = load_spec(args.spec)
    r, n = hr.init()  # gloo on CPU, NCCL on GPUs (the GPU of LOCAL_RANK), as train.py
    shares = [int(x) for x in args.shares.split(",")]
    assert len(shares) == n and sum(shares) == args.global_batch, (shares, n, args.global_batch)
    slowdowns = [float(x) for x in os.environ.get("HAP_EMULATE_SLOWDOWN", "").split(",") if x] or [1.0] * n
    slow = Dilation(slowdowns[r])
    torch.manual_seed(0)
    model = spec.model()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = model.to(device)
    model = wrap_ddp(model, slow, n) if args.strategy == "ddp" else wrap_fsdp2(model, slow)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    lo, scale = sum(shares[:r]), n * shares[r] / args.global_batch
    times, losses = [], []
    for step in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        mine = tuple(x[lo:lo + shares[r]].to(device) for x in spec.batch(step, args.global_batch))
        slow.mark()
        with torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            loss = model(*mine) * scale
        loss.backward()  # DDP: returns once every bucket's all-reduce is done
        if args.strategy == "fsdp2":
            slow.dilate()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        total = loss.detach().float() / n
        dist.all_reduce(total)
        losses.append(float(total))
    if r == 0:
        with open(args.log_json, "w") as f:
            json.dump({"step_s": times, "losses": losses}, f)
    hr.leave(0)  # as train.py leaves: gloo can abort a rank that destroys its group as a peer does


if __name__ == "__main__":
    sys.exit(main())
