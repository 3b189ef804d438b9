"""The training loop users expect, exact on uneven shards: AdamW with decoupled weight decay,
warm-up and cosine schedule, and clipping by the whole model's gradient norm on a plan that
shards weights (a program that clipped each shard by its own norm would differ)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from tests.e2e.harness import ROOT, rank_outputs, run_exact
from tests.helpers import GPT_GATHERED

CLUSTERS = ROOT / "profiles" / "clusters"
MEGATRON = {"p_hidden_1_weight": "S(0)", "p_hidden_1_bias": "S(0)", "p_hidden_2_weight": "S(1)"}
FLAGS = ["--optimizer", "adamw", "--weight-decay", "1.0", "--clip-grad-norm", "0.05", "--warmup-steps", "2",
         "--schedule", "cosine"]
SAME = {"optimizer": "adamw", "weight_decay": 1.0, "clip": 0.05, "warmup": 2, "schedule": "cosine"}


@pytest.mark.parametrize("cluster,pins", [("default", MEGATRON), ("cpu-1-2-4", None)])
def test_adamw_cosine_clipping_and_micro_batches_are_exact(cluster, pins, tmp_path, monkeypatch):
    # sharded weights: every rank runs 2 micro-batches in lockstep through the resharding
    # collectives; data parallel: each rank's share in 2 pieces of its own
    monkeypatch.setenv("HAP_MLP_WIDTH", "512")
    monkeypatch.setenv("HAP_MLP_BATCH", "256")
    plan, loss_err, param_err = run_exact(str(ROOT / "examples/mlp.py"), str(CLUSTERS / f"{cluster}.toml"), tmp_path,
                                          steps=5, lr=1e-3, pins=pins, train=SAME,
                                          train_args=[*FLAGS, "--micro-batches", "2", "--tensorboard",
                                                      str(tmp_path / "tb")])
    assert len(set(plan.shares)) > 1
    if pins:
        assert plan.nodes["p_hidden_1_weight"].output == "S(0)"
    log = json.loads((tmp_path / "log.json").read_text())
    assert min(log["grad_norm"]) > 0.05, log["grad_norm"]  # the clipping was active every step
    assert log["lr"][:2] == pytest.approx([5e-4, 1e-3]) and log["lr"][-1] < log["lr"][2]
    # each rank's peak memory, gathered to rank 0: a process that imported torch holds > 100 MB
    peaks = log["peak_memory_bytes"]
    assert len(peaks) == plan.num_ranks and min(peaks) > 100e6, peaks
    # --tensorboard: rank 0's event files hold what --log-json holds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(log["losses"], rel=1e-6)
    assert [e.value for e in events.Scalars("train/grad_norm")] == pytest.approx(log["grad_norm"], rel=1e-6)
    assert [e.step for e in events.Scalars("train/lr")] == list(range(5))
    assert loss_err < 1e-5 and param_err < 1e-4, (loss_err, param_err)


def test_micro_batches_chosen_for_small_memory_ranks_are_exact_with_ignored_targets(tmp_path):
    # two CPU ranks with 1.5 MB each, the second 2x slower: the plan cuts each rank's share into
    # its own number of micro-batches (the shares follow speed, the micro-batches memory), and
    # the cross-entropy's count of kept targets is summed over every rank's micro-batches
    profile = json.loads((ROOT / "profiles/devices/cpu.json").read_text())
    profile["memory_bytes"] = 1_500_000
    (tmp_path / "cpu-small.json").write_text(json.dumps(profile))
    (tmp_path / "small.toml").write_text('name = "cpu-small-memory"\n'
                                         '[[nodes]]\ndevice = "cpu-small.json"\ncount = 1\nnode = "localhost"\n'
                                         '[[nodes]]\ndevice = "cpu-small.json"\ncount = 1\nnode = "localhost"\n'
                                         'slowdown = 2.0\n')
    plan, loss_err, param_err = run_exact(str(ROOT / "tests/models/masked_lm.py"), str(tmp_path / "small.toml"),
                                          tmp_path, steps=3, lr=0.05)
    assert plan.shares[0] > plan.shares[1] and plan.micro_batches[0] > plan.micro_batches[1] > 1, \
        (plan.shares, plan.micro_batches)
    assert any("micro-batches" in n for n in plan.notes)
    assert loss_err < 1e-5 and param_err < 1e-5, (loss_err, param_err)




@pytest.mark.parametrize("spec,cluster,pins", [("gpt", "cpu-1-2-4", None), ("mlp", "cpu-slow-net", None),
                                               ("gpt", "cpu-1-2-4", GPT_GATHERED)],
                         ids=["gpt", "mlp-tensor-parallel", "gpt-gathered"])
def test_recomputed_blocks_in_micro_batches_train_exactly(spec, cluster, pins, tmp_path):
    # activation checkpointing reruns each block's forward in backward, inside every micro-batch,
    # with the block's resharding collectives (the pinned gpt gathers four weights per block, each
    # started while the one before computes; mlp on cpu-slow-net is tensor parallel): the same gradients
    plan, loss_err, param_err = run_exact(str(ROOT / f"examples/{spec}.py"), str(CLUSTERS / f"{cluster}.toml"),
                                          tmp_path, steps=3, recompute="all", train_args=["--micro-batches", "2"],
                                          pins=pins, stages=1)
    assert plan.recompute == tuple(plan.graph.blocks())
    text = (tmp_path / "out" / "train.py").read_text()
    assert text.count("= hr.recompute(block_") == len(plan.recompute)
    if spec == "mlp":
        assert any(m.kind in ("all_gather", "reduce_scatter") for m in plan.moves)
    if pins:
        block = text.split("def block_blocks_1")[1].split("hr.recompute")[0]
        assert "= hr.Prefetch([" in block and block.count("gathers_blocks_1.take(") == 4, block
        assert "], ahead=None)" in block  # the block runs no other collective: its gathers all start with it
    assert loss_err < 1e-5 and param_err < 1e-4, (loss_err, param_err)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_ranks_that_keep_recomputed_blocks_join_their_gathers_and_train_exactly(precision, tol, tmp_path):
    # the search gives each rank the fewest blocks it must recompute; here rank 0 keeps both
    # blocks, rank 1 recomputes both and rank 2 only the first. A rank that keeps a block starts
    # its four weight gathers again where the others recompute it, so the collectives pair up
    # (in bf16 the gathers move the weights' bf16 copies)
    def counts(plan):
        return dataclasses.replace(plan, recompute_counts=(0, 2, 1))

    plan, loss_err, param_err = run_exact(str(ROOT / "examples/gpt.py"), str(CLUSTERS / "cpu-1-2-4.toml"), tmp_path,
                                          steps=3, recompute="all", pins=GPT_GATHERED, edit=counts,
                                          train_args=["--micro-batches", "2"], precision=precision)
    text = (tmp_path / "out" / "train.py").read_text()
    assert "recompute_counts=(0, 2, 1)" in text
    assert "keep=layout.recompute_counts[RANK] <= 0)" in text and "keep=layout.recompute_counts[RANK] <= 1)" in text
    assert loss_err < tol and param_err < tol, (loss_err, param_err)


DEFERRED = r"""
import contextlib, json, sys, torch
import hap.runtime as hr
from hap.runtime import collectives
rank, _ = hr.init()
lengths = (5, 2)  # uneven shards of dim 0 of w1 (7 x 3) and of dim 1 of w2 (3 x 7)
torch.manual_seed(0)
full1, full2, x = torch.randn(7, 3), torch.randn(3, 7), torch.randn(4, 3)
rows = slice(sum(lengths[:rank]), sum(lengths[:rank + 1]))
out = {}
for deferred in (False, True):
    w1 = torch.nn.Parameter(full1[rows].clone())
    w2 = torch.nn.Parameter(full2[:, rows].clone())
    w3 = torch.nn.Parameter(torch.arange(7.0)[rows].clone())  # gathered where it is read, not ahead
    started = []  # reduce-scatters under way when backward reaches the first linear
    for micro in range(2):  # gradients accumulate over two micro-batches
        gathers = hr.Prefetch([(w1, 0, lengths, "padded", None), (w2, 1, lengths, "grouped", None)])
        h = torch.nn.functional.linear(x[2 * micro: 2 * micro + 2], gathers.take(0)) * hr.all_gather(w3, 0, lengths)
        h.register_hook(lambda g: started.append(len(collectives._deferred or [])))
        loss = (torch.nn.functional.linear(h, gathers.take(1)) ** 2).sum()
        with collectives.deferred_grads() if deferred else contextlib.nullcontext():
            loss.backward()
    out[str(deferred)] = {"w1": w1.grad.tolist(), "w2": w2.grad.tolist(), "w3": w3.grad.tolist(), "started": started}
json.dump(out, open(sys.argv[1] + f".{rank}", "w"))
hr.leave(0)
"""


def test_deferred_reduce_scatters_run_during_backward_and_give_the_same_gradients(tmp_path):
    """Inside deferred_grads a gathered weight's reduce-scatter (prefetched or not) starts when
    backward reaches it and runs on while backward computes the layers before; the gradients it
    leaves, accumulated over micro-batches, are autograd's own, bit for bit, on uneven shards and
    both forms."""
    for got in rank_outputs(DEFERRED, tmp_path):
        assert all(got["True"][w] == got["False"][w] for w in ("w1", "w2", "w3"))
        assert got["True"]["started"] == [1, 1] and got["False"]["started"] == [0, 0]


def _overlapping_cpu_cluster(tmp_path) -> str:
    """Two CPU ranks of the shipped profile with ``overlap_comm`` on (a device that computes
    while it communicates, as a GPU does); the second is 3x slower, so the shares are uneven."""
    profile = json.loads((ROOT / "profiles/devices/cpu.json").read_text())
    profile["overlap_comm"] = True
    (tmp_path / "cpu-overlap.json").write_text(json.dumps(profile))
    nodes = "".join(f'[[nodes]]\ndevice = "{tmp_path / "cpu-overlap.json"}"\ncount = 1\nslowdown = {s}\n'
                    f'node = "localhost"\n' for s in (1.0, 3.0))
    (tmp_path / "cluster.toml").write_text(f'name = "overlap"\n{nodes}')
    return str(tmp_path / "cluster.toml")


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_gradient_buckets_are_all_reduced_while_backward_runs_and_training_stays_exact(precision, tol, tmp_path,
                                                                                       monkeypatch):
    from hap.runtime.logger import PHASES

    monkeypatch.setenv("HAP_MLP_WIDTH", "1024")  # 4 MiB weights: several buckets
    monkeypatch.setenv("HAP_MLP_BATCH", "1024")  # compute-bound: data parallel, no collectives in backward
    plan, loss_err, param_err = run_exact(str(ROOT / "examples/mlp.py"), _overlapping_cpu_cluster(tmp_path), tmp_path,
                                          steps=4, lr=1e-3, precision=precision)
    assert plan.predicted.grad_overlap and len(plan.predicted.grad_buckets) > 1, plan.predicted
    assert len(set(plan.shares)) > 1
    log = json.loads((tmp_path / "log.json").read_text())
    # every step, the first bucket's all-reduce started before backward ended
    assert len(log["grad_overlap_s"]) == 4 and min(log["grad_overlap_s"]) > 0, log["grad_overlap_s"]
    # the phases each rank logged sum to its step; rank 0's are the step it logged
    phases = log["phase_s"]
    assert list(phases) == list(PHASES) and all(len(row) == 2 for row in phases["compute"])
    for i, step_s in enumerate(log["step_s"]):
        assert sum(phases[p][i][0] for p in PHASES) == pytest.approx(step_s, rel=1e-4)
        assert min(phases["compute"][i]) > 0 and min(phases["grad_sync"][i]) > 0
    assert loss_err < tol and param_err < tol, (loss_err, param_err)


@pytest.mark.parametrize("spec", ["tests/models/masked_lm.py", "tests/models/two_class_losses.py"])
def test_class_loss_counts_ride_in_the_gradient_sync_and_stay_exact(spec, tmp_path):
    # one class loss with ignored targets: its count is deferred (no all-reduce in forward, the
    # gradients rescaled once); two: the first forward runs again counting each in forward, and
    # BatchNorm's running statistics (compared with one device's) count that step once
    plan, loss_err, param_err = run_exact(str(ROOT / spec), str(CLUSTERS / "cpu-1-2-4.toml"), tmp_path, steps=3)
    assert len(set(plan.shares)) > 1
    assert loss_err < 1e-5 and param_err < 1e-5, (loss_err, param_err)


def test_a_loss_run_in_chunks_on_one_rank_and_whole_on_the_others_trains_exactly(tmp_path):
    from hap.cost import CostSetup
    from hap.rules.loss import chunked_losses

    spec = str(ROOT / "tests/models/wide_vocab.py")
    plan, loss_err, param_err = run_exact(spec, str(CLUSTERS / "cpu-1-2-4.toml"), tmp_path, steps=2, lr=0.5)
    (loss,) = chunked_losses(plan.graph)
    on = CostSetup.of_plan(plan).cost_model(plan.graph, plan.cluster).chunked_on[loss]
    assert any(on) and not all(on), (plan.shares, on)  # the runtime decides by the same rule
    assert "hr.chunked_cross_entropy(" in (tmp_path / "out" / "train.py").read_text()
    assert loss_err < 1e-5 and param_err < 1e-5, (loss_err, param_err)
