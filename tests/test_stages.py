"""hap.stages: cutting a captured graph into pipeline stages that together compute exactly the
whole graph's loss and parameter gradients."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hap.capture import capture
from hap.errors import InfeasiblePlan
from hap.graph import Graph, decode_arg, resolve_target
from hap.stages import StageGraph, crossing, cut_candidates, shared_params, split
from tests.helpers import load_example


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt4():
    """examples/gpt.py with 4 blocks (tied embedding / head), captured on the CPU."""
    mod = load_example("gpt")
    torch.manual_seed(0)
    model = mod.GPT(layers=4)
    batch = mod.batch(0, 4)
    return model, batch, capture(model, batch)


@pytest.fixture(scope="module")
def llama3():
    """examples/hf_llama.py (tiny) with 3 decoder layers."""
    pytest.importorskip("transformers")
    mod = load_example("hf_llama")
    mod.LAYERS = 3  # LM() reads the module global
    torch.manual_seed(0)
    model = mod.model()
    batch = mod.batch(0, 4)
    return model, batch, capture(model, batch)


class SkipBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.tanh(self.lin(x))
        return out if skip is None else out + skip


class Skip(nn.Module):
    """Block 2 reads block 0's output: a skip over block 1."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SkipBlock() for _ in range(3))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h0 = self.blocks[0](x)
        h1 = self.blocks[1](h0)
        h2 = self.blocks[2](h1, h0)
        return F.mse_loss(self.head(h2).squeeze(-1), y)


class AuxLoss(nn.Module):
    """Block 0's scalar statistic joins the loss at the end (a grad tensor with no sample dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x)
        aux = h.pow(2).mean()
        h = self.blocks[1](h)
        return F.mse_loss(h.sum(-1), y) + 0.1 * aux


def tiny(model: nn.Module):
    torch.manual_seed(1)
    batch = (torch.randn(6, 8), torch.randn(6))
    return model, batch, capture(model, batch)


# ---------------------------------------------------------------------------------------
# an interpreter with autograd
# ---------------------------------------------------------------------------------------
def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.named_buffers()}  # non-persistent ones too
    return sd | {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(graph: Graph, state: dict, batch, params: dict[str, torch.Tensor]) -> dict:
    """Every node's value; parameters are the leaf tensors ``params`` (by state_dict key)."""
    values: dict = {}
    for n in graph:
        if n.kind == "param":
            values[n.name] = params.setdefault(n.target, state[n.target].clone().requires_grad_())
        elif n.kind == "buffer":
            values[n.name] = state[n.target].clone()
        elif n.kind == "input":
            values[n.name] = batch[int(n.target)]
        else:
            values[n.name] = resolve_target(n.target)(*decode_arg(n.args, values),
                                                      **{k: decode_arg(v, values) for k, v in n.kwargs.items()})
    return values


def whole(graph: Graph, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params: dict = {}
    loss = run(graph, state_of(model), batch, params)[graph.loss]
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in params.items()}


def pipelined(stages: list[StageGraph], model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward stage by stage, then backward from the last stage, each stage's received
    gradients fed to the stage before as its grad inputs; parameter gradients summed over stages."""
    state = state_of(model)
    acts: dict[str, torch.Tensor] = {}
    for st in stages:  # forward: what each stage sends (its grad inputs do not matter yet)
        zeros = [torch.zeros(st.graph[g].out.shape) for g in st.grads]
        values = run(st.graph, state, [batch[i] for i in st.inputs] + [acts[y] for y in st.receives] + zeros, {})
        acts |= {y: values[y].detach() for y in st.sends}
    grad_of: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    loss = None
    for st in reversed(stages):
        received = {y: acts[y].clone().requires_grad_() for y in st.receives}
        params: dict = {}
        b = [batch[i] for i in st.inputs] + [received[y] for y in st.receives] + [grad_of[y] for y in st.sends]
        out = run(st.graph, state, b, params)[st.graph.loss]
        out.backward()
        if st.index == len(stages) - 1:
            loss = out.detach()
        grad_of |= {y: t.grad for y, t in received.items()}
        for k, p in params.items():
            if p.grad is not None:
                grads[k] = grads[k] + p.grad if k in grads else p.grad
    return loss, grads


def assert_exact(graph: Graph, model: nn.Module, batch, cuts: list[int]) -> list[StageGraph]:
    stages = split(graph, cuts)
    want_loss, want = whole(graph, model, batch)
    got_loss, got = pipelined(stages, model, batch)
    assert torch.allclose(got_loss, want_loss, rtol=0, atol=1e-6), (got_loss, want_loss)
    assert set(got) == {k for k, g in want.items() if g is not None}
    for k, g in want.items():
        if g is None:
            continue
        assert torch.allclose(got[k], g, rtol=1e-5, atol=1e-7), f"{k}: differs by {(got[k] - g).abs().max():.3g}"
    return stages


def check_structure(graph: Graph, stages: list[StageGraph]) -> None:
    ops = set()
    for st in stages:
        st.graph.lint()
        ops |= {n.name for n in st.graph.ops()}
        inputs = [n for n in st.graph if n.kind == "input"]
        assert [n.target for n in inputs] == [str(k) for k in range(len(inputs))]
        assert st.graph.num_inputs == len(inputs)
        names = [n.name for n in inputs]
        assert names == [graph[n].name for n in names[:len(st.inputs)]] + list(st.receives) + list(st.grads)
        assert len(st.sends) == len(st.grads)
        if st.index < len(stages) - 1:
            assert stages[st.index + 1].receives == st.sends
            assert st.graph[st.graph.loss].target in ("aten.sum.default", "aten.add.Tensor")
        else:
            assert st.graph.loss == graph.loss and not st.sends
        for y in st.receives:  # an activation: grad, float, one row per sample
            assert y in graph.requires_grad() and graph[y].batch_dims[0] == [1, 0]
        assert st.graph.batch_size == graph.batch_size and st.graph.precision == graph.precision
    assert {n.name for n in graph.ops()} <= ops


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------
def test_cut_candidates_are_block_starts(gpt4):
    _, _, graph = gpt4
    cands = cut_candidates(graph)
    blocks = graph.blocks()
    assert list(blocks) == [f"blocks.{i}" for i in range(4)]
    assert [graph.nodes[c].name for c in cands] == [blocks[f"blocks.{i}"][0] for i in (1, 2, 3)]


def test_no_cut_is_the_whole_graph(gpt4):
    _, _, graph = gpt4
    (st,) = split(graph, [])
    assert st.graph.to_json() == graph.to_json()
    assert st.inputs == (0, 1) and not st.sends and not st.receives and st.blocks == tuple(graph.blocks())


def test_a_stage_prices_backward_through_what_it_receives(llama3):
    # the received residual carries a gradient back: the RMSNorm ops that read only it (pow,
    # mean, rsqrt) have a backward too, which a graph seeded by its weights alone misses
    _, _, graph = llama3
    second = split(graph, [cut_candidates(graph)[0]])[1]
    g = second.graph
    (received,) = second.receives
    assert g.differentiable_inputs == (received,)
    grad = g.requires_grad()
    from_weights = dataclasses.replace(g, differentiable_inputs=()).requires_grad()
    missed = {n.name for n in g.ops() if n.name in grad and n.name not in from_weights}
    assert any(received in g[x].inputs() for x in missed), missed
    assert Graph.from_json(g.to_json()).requires_grad() == grad


def test_gpt_stages_are_exact(gpt4):
    model, batch, graph = gpt4
    cands = cut_candidates(graph)
    for cuts in ([cands[1]], cands):
        stages = assert_exact(graph, model, batch, cuts)
        check_structure(graph, stages)
    # four stages: each sends the residual stream of its last block, nothing else
    assert [st.sends for st in stages] == [("add_2",), ("add_4",), ("add_6",), ()]
    assert [st.blocks for st in stages] == [(f"blocks.{i}",) for i in range(4)]
    assert [st.inputs for st in stages] == [(0,), (), (), (1,)]
    assert [st.grads for st in stages[:-1]] == [("grad_add_2",), ("grad_add_4",), ("grad_add_6",)]
    # the tied embedding / head weight is in the first and the last stage
    assert shared_params(stages) == {"tok.weight": (0, 3), "head.weight": (0, 3)}
    per_sample = graph["add_2"].out.nbytes / graph.batch_size
    assert crossing(graph, cands) == [per_sample] * 3
    # the surrogate loss of a sending stage
    g0 = stages[0].graph
    mul = g0[g0[g0.loss].inputs()[0]]
    assert mul.target == "aten.mul.Tensor" and mul.inputs() == ["add_2", "grad_add_2"]
    assert mul.batch_dims == graph["add_2"].batch_dims and g0[g0.loss].batch_dims == []
    assert g0["grad_add_2"].batch_dims == graph["add_2"].batch_dims


def test_llama_stages_are_exact_and_recompute_rotary(llama3):
    model, batch, graph = llama3
    cands = cut_candidates(graph)
    assert len(cands) == 2
    stages = assert_exact(graph, model, batch, cands)
    check_structure(graph, stages)
    grad = graph.requires_grad()
    rotary = [n.name for n in graph.ops() if "rotary_emb" in n.module and n.meta is not None]
    assert rotary
    for st in stages:
        assert len(st.receives) == (st.index > 0) and len(st.sends) == (st.index < 2)
        names = {n.name for n in st.graph}
        assert set(rotary) <= names, f"stage {st.index} lacks the rotary embedding"
        assert "b_hf_model_rotary_emb_inv_freq" in names
        # what a later stage recomputes has no gradient; what it receives has one
        recomputed = {n.name for n in st.graph.ops()} - {n for b in st.blocks for n in graph.blocks()[b]}
        if 0 < st.index < 2:
            assert recomputed and not recomputed & grad
    # the attention mask every layer reads is recomputed too
    mask = graph[next(n for n in graph.block_of() if graph[n].target.endswith("scaled_dot_product_attention.default"))]
    assert all(mask.inputs()[3] in st.graph for st in stages)
    assert not shared_params(stages)


def test_two_stage_llama_sends_one_residual(llama3):
    model, batch, graph = llama3
    stages = assert_exact(graph, model, batch, [cut_candidates(graph)[0]])
    (y,) = stages[0].sends
    assert graph[y].target == "aten.add.Tensor" and graph[y].module.startswith("hf.model.layers.0")


def test_skip_over_a_stage_is_refused():
    model, batch, graph = tiny(Skip())
    cands = cut_candidates(graph)
    assert len(cands) == 2
    with pytest.raises(InfeasiblePlan) as e:
        split(graph, cands)
    msg = str(e.value)
    assert "stage 2" in msg and "made in stage 0" in msg and "skips stage 1" in msg and "choose other cuts" in msg
    with pytest.raises(InfeasiblePlan):
        crossing(graph, cands)
    # cutting only after block 0 keeps the skip inside one stage: exact
    assert_exact(graph, model, batch, [cands[0]])
    # cutting only before block 2 sends both h1 and h0: two sends, one surrogate summing both
    stages = assert_exact(graph, model, batch, [cands[1]])
    assert len(stages[0].sends) == 2 and stages[0].graph[stages[0].graph.loss].target == "aten.add.Tensor"
    check_structure(graph, stages)


def test_grad_scalar_crossing_is_refused():
    _, _, graph = tiny(AuxLoss())
    with pytest.raises(InfeasiblePlan, match="one row per sample"):
        split(graph, cut_candidates(graph))


def test_bad_cuts_are_refused(gpt4):
    _, _, graph = gpt4
    cands = cut_candidates(graph)
    for cuts in ([cands[0] + 1], [cands[1], cands[0]], [cands[0], cands[0]]):
        with pytest.raises(InfeasiblePlan, match="block boundaries"):
            split(graph, cuts)


def test_autocast_surrogate_follows_activation_dtype(gpt4):
    from hap.precision import autocast_graph

    _, _, graph = gpt4
    bf16 = autocast_graph(graph, "bf16")
    stages = split(bf16, cut_candidates(bf16))
    for st in stages[:-1]:
        (y,) = st.sends
        g = st.graph
        assert g[g.loss].out.dtype == bf16[y].out.dtype == g[f"grad_{y}"].out.dtype
        assert g.precision == "bf16"
