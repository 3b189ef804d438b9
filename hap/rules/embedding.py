"""Embeddings: shard the indices (data parallel), the embedding dim, or the rows of the
table (vocabulary parallel: each rank looks up the rows it owns, others give 0, sum = P)."""
from __future__ import annotations

from hap.graph import Node
from hap.rules import Candidate, P, R, RuleContext, S, is_ref, renders, rule


@rule("aten.embedding.default")
def embedding(node: Node, ctx: RuleContext) -> list[Candidate]:
    refs = node.inputs()
    w, idx = ctx.meta(refs[0]), ctx.meta(refs[1])
    out_nd = node.out.ndim
    cands = []
    for d in range(idx.ndim):
        for u in ctx.shard_units(idx.shape[d]):
            cands.append(Candidate(f"idx:S({d})" if u == 1 else f"idx:S({d}/{u})", (R, S(d, u)), S(d, u),
                                   split=(idx.shape[d], u)))
    for u in ctx.shard_units(w.shape[1]):
        cands.append(Candidate(f"dim:S({out_nd - 1})" if u == 1 else f"dim:S({out_nd - 1}/{u})", (S(1, u), R),
                               S(out_nd - 1, u), split=(w.shape[1], u)))
    for u in ctx.shard_units(w.shape[0]):
        if u == 1:
            cands.append(Candidate("rows:P", (S(0), R), P, split=(w.shape[0], 1), emit="vocab_embedding"))
    return cands


@rule("aten.embedding_bag.padding_idx", "aten.embedding_bag.default", "aten._embedding_bag.default")
def embedding_bag(node: Node, ctx: RuleContext) -> list[Candidate]:
    """Shard the embedding dim of the table (bags and offsets replicated). The op returns
    (output [B, D], offset2bag, bag_size, max_indices): ``S(1)`` of the list applies to the
    output; the 1-d integer results do not depend on the table and are replicated (see the
    getitem rule). Sharding the batch needs offsets relative to each rank's bags, and the
    rows a rank-local index remap: neither is a plain call of the op."""
    refs = node.inputs()
    w = ctx.meta(refs[0])
    cands = []
    for u in ctx.shard_units(w.shape[1]):
        ins = (S(1, u),) + tuple(R for _ in refs[1:])
        cands.append(Candidate("dim:S(1)" if u == 1 else f"dim:S(1/{u})", ins, S(1, u), split=(w.shape[1], u)))
    # rows: each rank holds a block of the table's rows and sums the bags' owned rows (P);
    # sum and mean modes only (a max over rows is not a sum)
    mode = node.args[4] if len(node.args) > 4 else node.kwargs.get("mode", 0)
    if node.target == "aten.embedding_bag.padding_idx" and mode in (0, 1) and 1 in ctx.shard_units(w.shape[0]):
        ins = (S(0),) + tuple(R for _ in refs[1:])
        cands.append(Candidate("rows:P", ins, P, split=(w.shape[0], 1), emit="embedding_bag_rows"))
    return cands


@rule("aten.one_hot.default")
def one_hot(node: Node, ctx: RuleContext) -> list[Candidate]:
    idx = ctx.meta(node.inputs()[0])
    return [Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", (S(d, u),), S(d, u), split=(idx.shape[d], u))
            for d in range(idx.ndim) for u in ctx.shard_units(idx.shape[d])]


def _row_block(em, node: Node) -> tuple[str, str]:
    """This rank's first row and number of rows of the table it owns, as code (the table's rows
    follow LENGTHS, which a re-balancing program updates)."""
    _, ls = em.tensor_lengths(node.inputs()[0], S(0))
    return f"hr.offset({ls}, RANK)", f"{ls}[RANK]"


@renders("vocab_embedding")
def vocab_embedding(em, node: Node, cand: Candidate, refs: list[str]) -> str:
    """Rows of the table sharded: each rank looks up the ids it owns, zeros elsewhere (P)."""
    offs, ls = _row_block(em, node)
    return f"vocab_embedding({refs[0]}, {refs[1]}, {offs}, {ls})"


@renders("embedding_bag_rows")
def embedding_bag_rows(em, node: Node, cand: Candidate, refs: list[str]) -> str:
    """Rows of a bag table sharded: each rank sums the rows it owns into a partial bag (P).
    embedding_bag.padding_idx(weight, indices, offsets, scale_grad, mode, sparse, psw, last, pad)."""
    offs, ls = _row_block(em, node)
    a = list(node.args) + [None] * (9 - len(node.args))
    psw = refs[3] if is_ref(a[6]) else "None"
    rows = em.graph[node.inputs()[0]].out.shape[0]
    return (f"embedding_bag_rows({refs[0]}, {refs[1]}, {refs[2]}, {offs}, {ls}, {rows}, "
            f"mode={a[4]!r}, per_sample_weights={psw}, include_last_offset={bool(a[7])!r}, "
            f"padding_idx={a[8]!r})")
