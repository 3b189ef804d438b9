"""Every sharding candidate of every node of the examples, run rank by rank on local
shards (uneven, with a zero share), reproduces the single-device value in its placement."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hap.capture import capture
from hap.placement import Splitter
from hap.rules import RuleContext, candidates, view_units
from tests.helpers import captured, check_all_candidates, load_example, run_graph

SHARES = {2: (5, 3), 3: (4, 0, 4)}


HF_EXAMPLES = ["hf_gpt2", "hf_bert", "hf_llama", "hf_usage"]


@pytest.mark.parametrize("example", ["mlp", "gpt", "cnn", "vgg19", "vit", "bert", "bert_moe", "dlrm", *HF_EXAMPLES,
                                     "hf_usage", "torch_transformer"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_every_candidate_is_exact(example, ranks):
    if example in HF_EXAMPLES:
        pytest.importorskip("transformers")
    mod = load_example(example)
    model, batch, graph = captured(mod, batch_size=8)
    values = run_graph(graph, model, batch)
    assert torch.allclose(values[graph.loss], model(*batch)), "captured graph must compute the model's loss"
    checked, errors = check_all_candidates(graph, values, SHARES[ranks])
    assert checked > 3 * len(graph.ops()) // 2
    assert not errors, "\n".join(errors[:10])


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_candidate_of_t5_as_documented_is_exact(ranks, monkeypatch):
    """T5's label shifting and relative position buckets (to.device, min.other, where.ScalarOther)."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HAP_HF_MODEL", "t5")
    model, batch, graph = captured(load_example("hf_usage"), batch_size=8)
    values = run_graph(graph, model, batch)
    assert torch.allclose(values[graph.loss], model(*batch))
    checked, errors = check_all_candidates(graph, values, SHARES[ranks])
    assert checked > len(graph.ops())
    assert not errors, "\n".join(errors[:10])


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_candidate_of_llama_as_documented_is_exact(ranks, monkeypatch):
    """Llama with the library's default use_cache: its DynamicCache concatenates each layer's keys
    and values onto a 1-d empty tensor, which must not force them to be gathered."""
    pytest.importorskip("transformers")
    from hap.placement import Splitter
    from hap.rules import RuleContext, candidates, view_units

    monkeypatch.setenv("HAP_HF_MODEL", "llama")
    model, batch, graph = captured(load_example("hf_usage"), batch_size=8)
    onto_empty = [n for n in graph.ops() if n.target == "aten.cat.default"
                  and any(graph[i].meta.shape == (0,) for i in n.inputs())]
    assert onto_empty, "the cache's concatenation is in the graph"
    ctx = RuleContext(graph, Splitter(SHARES[ranks]), view_units(graph))
    assert any(str(c.output) == "S(0)" for c in candidates(onto_empty[0], ctx))
    values = run_graph(graph, model, batch)
    checked, errors = check_all_candidates(graph, values, SHARES[ranks])
    assert checked > len(graph.ops())
    assert not errors, "\n".join(errors[:10])


class Zoo(nn.Module):
    """Ops the examples do not use: BatchNorm in eval, einsum, bmm, addmm, softmax, mean, cat, stack, topk."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.b = nn.Parameter(torch.randn(8))
        self.emb = nn.Embedding(10, 6)
        self.ln = nn.LayerNorm(8)
        self.gate = nn.Linear(8, 4)
        self.experts = nn.Parameter(torch.randn(4, 8, 8) * 0.1)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, idx, y):
        x = self.emb(idx)  # [B, T, 6]
        h = torch.einsum("btd,de->bte", x, self.w) + self.b
        h = self.ln(h)
        probs = F.softmax(self.gate(h), dim=-1)  # [B, T, 4]
        top, which = torch.topk(probs, 2, dim=-1)
        onehot = F.one_hot(which[..., 0], 4).to(h.dtype)
        mixed = torch.einsum("bte,eij,btj->bti", onehot, self.experts, h)
        z = torch.cat([mixed, h], dim=-1).mean(dim=1)  # [B, 16]
        z = torch.stack([z, z * 2], dim=1).sum(dim=1)
        c = self.conv(h.transpose(1, 2)).transpose(1, 2).mean(dim=(1, 2))
        att = torch.bmm(h, h.transpose(1, 2)).softmax(-1).mean()
        return F.mse_loss(z[:, :8] + top.sum(-1).mean(-1, keepdim=True), y) + c.pow(2).mean() + att


def every_candidate_is_exact(model: nn.Module, batch: tuple[torch.Tensor, ...],
                             shares: tuple[tuple[int, ...], ...] = ((4, 2), (3, 0, 3))):
    """Capture ``model`` on ``batch`` and check every candidate of every node rank by rank on
    each share vector; returns the graph."""
    graph = capture(model, batch)
    values = run_graph(graph, model, batch)
    assert torch.allclose(values[graph.loss], model(*batch))
    for sh in shares:
        checked, errors = check_all_candidates(graph, values, sh)
        assert checked > len(graph.ops())
        assert not errors, "\n".join(errors[:10])
    return graph


def test_zoo_candidates_are_exact():
    torch.manual_seed(0)
    every_candidate_is_exact(Zoo(), (torch.randint(0, 10, (6, 5)), torch.randn(6, 8)))


class Routing(nn.Module):
    """Rows gathered by an index, as routers do (``x[idx]``), and a column pick (``x[:, idx]``)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.table = nn.Parameter(torch.randn(10, 6))

    def forward(self, ids, x):
        rows = self.table[ids]  # [B, T, 6]: the table's rows, gathered by a batch of indices
        order = torch.argsort(x[:, 0])
        picked = (x @ self.w)[order]  # [B, 6]
        cols = x[:, torch.tensor([1, 3, 5])]  # [B, 3]
        return rows.pow(2).mean() + picked.pow(2).mean() + cols.sum()


def test_index_candidates_are_exact():
    torch.manual_seed(0)
    graph = every_candidate_is_exact(Routing(), (torch.randint(0, 10, (6, 5)), torch.randn(6, 8)))
    index = [n for n in graph.ops() if n.target == "aten.index.Tensor"]
    assert len(index) == 3
    for shares in ((4, 2), (3, 0, 3)):
        ctx = RuleContext(graph, Splitter(shares), view_units(graph))
        assert all(len(candidates(n, ctx)) > 1 for n in index), "every x[idx] here has a sharded candidate"


class GroupedExperts(nn.Module):
    """transformers' grouped matmul over rows sorted by expert, and an index_put_ back to order."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 6))
        self.proj = nn.Parameter(torch.randn(8, 8))

    def forward(self, x, expert):
        sorted_ids, perm = torch.sort(expert)
        offs = torch.cumsum(torch.histc(sorted_ids.float(), bins=3, min=0, max=2), 0).to(torch.int32)
        h = x @ self.proj
        out = torch.ops.transformers.grouped_mm_fallback(h[perm], self.w, offs)  # [B, 6]
        back = torch.zeros_like(out)
        back[perm] = out  # index_put_
        return back.pow(2).mean()


def test_grouped_mm_and_index_put_candidates_are_exact():
    pytest.importorskip("transformers")
    import transformers.integrations.moe  # noqa: F401  (registers the grouped matmul)

    torch.manual_seed(0)
    graph = every_candidate_is_exact(GroupedExperts(), (torch.randn(6, 8), torch.randint(0, 3, (6,))))
    ctx = RuleContext(graph, Splitter((4, 2)), view_units(graph))
    for target in ("transformers.grouped_mm_fallback.default", "aten.index_put_.default"):
        node = next(n for n in graph.ops() if n.target == target)
        assert len(candidates(node, ctx)) > 1, target


def test_megatron_linears_are_expressible():
    mod = load_example("mlp")
    _, _, graph = captured(mod, batch_size=8)
    ctx = RuleContext(graph, Splitter((5, 3)), view_units(graph))
    lin = [n for n in graph.ops() if n.target == "aten.linear.default"][1]
    names = {c.name: c for c in candidates(lin, ctx)}
    col = [c for c in names.values() if c.output.kind == "S" and c.output.dim == 1 and c.inputs[0].kind == "R"]
    row = [c for c in names.values() if c.output.kind == "P" and c.inputs[1].kind == "S" and c.inputs[1].dim == 1]
    dp = [c for c in names.values() if c.output.kind == "S" and c.output.dim == 0 and c.inputs[1].kind == "R"]
    assert col and row and dp
    assert row[0].inputs[2].kind == "P", "a row-parallel bias must be added once (P)"


def test_unknown_op_runs_replicated_with_warning():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.special.i0(self.lin(x)).mean()

    g = capture(Odd(), (torch.randn(4, 4),))
    node = next(n for n in g.ops() if "i0" in n.target)
    ctx = RuleContext(g, Splitter((2, 2)), view_units(g))
    assert [c.name for c in candidates(node, ctx)] == ["R"]
    from hap.errors import UnsupportedOp
    with pytest.raises(UnsupportedOp, match="i0"):
        candidates(node, ctx, strict=True)
