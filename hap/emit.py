"""Emit: a Plan becomes one readable SPMD ``train.py`` (+ ``plan.json``).

The forward is straight-line code over local shards, one line per captured ATen node,
each commented with the model source it came from and its placements; collectives of
``hap.runtime`` appear where the plan moves a tensor between placements. Shape
arguments are specialised to the rank's local lengths. The program imports the model
spec by its path relative to ``train.py`` (no path of the planning machine) and
``hap.runtime``, nothing of the planner.

train.py is code hap wrote: every name, path and field a user or a plan.json supplies is
written as data (a ``repr`` literal, or escaped text in the docstring and comments), and
whatever train.py names as code is checked first (``check_plan_code``): graph names are
identifiers, op targets are registered ``torch.ops`` overloads or ``KNOWN_TARGETS``,
sizes are integers. Anything else is refused with a PlanFileError.
"""
from __future__ import annotations

import dataclasses
import json
import keyword
import os
import shlex
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hap.cost import low_precision_gathers, weight_gather
from hap.errors import HapError, PlanFileError
from hap.graph import Graph, Node, TensorMeta
from hap.moves import COLLECTIVES, move
from hap.placement import Placement, Splitter
from hap.runtime.layout import FORMAT as LAYOUT_FORMAT
from hap.stages import shared_in, shared_weights

if TYPE_CHECKING:
    from hap.plan import Plan
from hap.rules import FORWARD_COLLECTIVE_EMITS, RENDERERS, Candidate, Local, is_ref
from hap.rules.loss import chain_unmoved, chunked_loss, chunked_losses, mean_loss

# the targets train.py calls that are not torch.ops overloads: each is written by a fixed rule
KNOWN_TARGETS = {
    "getitem": "an element of a list-valued node, written x[i]",
    "torch.tensor": "a tensor literal made inside forward, written torch.tensor(...)",
}
# the names forward reads (its arguments, the layout's values it unpacks, train.py's globals): no graph
# name may shadow them
FORWARD_GLOBALS = frozenset({
    "torch", "hr", "aten", "layout", "RANK", "ROWS", "LENGTHS", "DEVICE", "class_loss_count",
    "embedding_bag_rows", "vocab_embedding", "sum", "tuple", "float",
})
# encoded argument values (hap.capture._encode) that train.py writes as torch.<name>
TORCH_ATTRIBUTES = ("dtype", "memory_format", "layout")


class Code(str):
    """A Python expression that ``repr`` writes as itself (a collective's lengths in train.py)."""

    def __repr__(self) -> str:
        return str(self)


class Emitter:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.graph: Graph = plan.graph
        self.splitter = Splitter(plan.shares)
        self.choice: dict[str, Candidate] = plan.choice()
        self.lengths_used: dict[tuple[int, int], str] = {}  # fixed dims read per rank: (size, unit) -> variable
        self.length_keys: set[tuple[int, int]] = set()  # fixed dims of LENGTHS (per rank or whole)
        self.rows_used: set[int] = set()  # samples-per-row factors f of batch dims the forward reads
        self.total_used = False  # the forward reads B, the samples of its (micro-)batch over all ranks
        # why the program cannot run other batch sizes than the plan's (micro-batches); empty: it can
        self.fixed_batch: list[str] = [] if plan.graph.batch_size else \
            ["the model did not capture at twice the batch, so hap cannot tell which sizes follow the batch"]
        self.fixed_batch += [f"{where} multiplies two statistics of the whole batch (a router's load-balancing "
                             "loss), which micro-batches would take per piece" for where in plan.graph.batch_products()]
        self.converted: dict[tuple[str, Placement], str] = {}
        self.made_in_block: list[tuple[str, Placement]] = []  # conversions since the current block began
        self.lines: list[str] = []
        self.defined: set[str] = set()  # the local variables and functions forward defines besides graph names
        self.low_gathers = low_precision_gathers(self.graph)  # weights gathered as autocast's low-precision copy
        self.block_of = self.graph.block_of()
        self.block: str | None = None  # the block whose ops are being written
        self.prefetched: list[str] = []  # the block's weight gathers, as hr.Prefetch takes them
        self.block_collective = False  # the block runs a collective besides its weight gathers
        # cross-entropies run in chunks (hap.rules.loss.chunked_losses), where the plan moves nothing
        # inside their chain; their chain's lines are not written
        self.chunked = {name: c for name, c in chunked_losses(self.graph).items() if chain_unmoved(c, self.choice)}
        self.unwritten = {x for c in self.chunked.values() for x in c.skipped}
        # blocks some ranks recompute and others keep: their forward runs no collective but their
        # weights' gathers, the only ones the ranks that keep them join again (hap.runtime.ops.recompute)
        counts = getattr(plan, "recompute_counts", ())
        self.mixed_blocks = {b for i, b in enumerate(getattr(plan, "recompute", ()))
                             if len({i < k for k in counts}) > 1}

    # ---- helpers -----------------------------------------------------------------------
    def lengths(self, size: int, unit: int = 1) -> tuple[int, ...]:
        return self.splitter.lengths(size, unit)

    def len_var(self, size: int, unit: int = 1) -> str:
        key = (size, unit)
        self.length_keys.add(key)
        if key not in self.lengths_used:
            self.lengths_used[key] = f"n{size}" if unit == 1 else f"n{size}_{unit}"
            self.defined.add(self.lengths_used[key])
        return self.lengths_used[key]

    def batch_factor(self, fc: list[int] | None, size: int, unit: int, where: str) -> int:
        """f when a size of ``f*B`` follows the batch and splits as ``f`` x each rank's samples
        (0: a fixed size). A size that follows the batch in any other way pins the batch size."""
        if not fc or not fc[0]:
            return 0
        f, c = fc
        if c == 0 and self.lengths(size, unit) == tuple(f * n for n in self.plan.shares):
            return f
        self.fixed_batch.append(f"{where} has {size} = {f}*B{c:+d} elements, sharded {unit} at a time")
        return 0

    def rows(self, f: int) -> str:
        """Per-rank lengths of a batch dim with ``f`` elements per sample, in this (micro-)batch."""
        if f == 1:
            return "ROWS"
        self.rows_used.add(f)
        self.defined.add(f"rows{f}")
        return f"rows{f}"

    def tensor_lengths(self, name: str, p: Placement) -> tuple[int, Code]:
        """(dim, expression of every rank's length) of tensor ``name`` sharded as ``p``: a batch dim
        follows ROWS, any other dim reads LENGTHS."""
        node = self.graph[name]
        meta = node.meta[0] if isinstance(node.meta, list) else node.meta
        d = p.dim if p.dim >= 0 else p.dim + meta.ndim
        size = meta.shape[d]
        f = self.batch_factor(node.batch_dims[d] if node.batch_dims else None, size, p.unit, f"{name} dim {d}")
        if f:
            return d, Code(self.rows(f))
        self.length_keys.add((size, p.unit))
        return d, Code(f"LENGTHS[{size}, {p.unit}]")

    def shard_lengths(self, meta: TensorMeta, p: Placement) -> tuple[int, tuple[int, ...]]:
        d = p.dim if p.dim >= 0 else p.dim + meta.ndim
        return d, self.lengths(meta.shape[d], p.unit)

    def out_placement(self, name: str) -> Placement:
        return self.choice[name].output

    def ref(self, name: str, want: Placement, source: str) -> str:
        """The local variable holding tensor ``name`` in placement ``want`` (emitting the move)."""
        have = self.out_placement(name)
        if have == want:
            return name
        key = (name, want)
        if key in self.converted:
            return self.converted[key]
        meta = self.graph[name].meta
        assert isinstance(meta, TensorMeta), f"cannot move list-valued {name}"
        var = f"{name}__{_pname(want)}"
        self.defined.add(var)
        mv = move(have, want)
        src = self.tensor_lengths(name, have) if have.is_shard else None
        dst = self.tensor_lengths(name, want) if want.is_shard else None
        gathered = weight_gather(self.graph[name], have, want)
        cast = self.low_gathers.get(name) if gathered else None
        if gathered and self.block is not None:
            _, args, kwargs = mv.call(src, dst, self.form(name, want), cast)
            self.prefetched.append(f"({name}, {', '.join(repr(a) for a in args)}, {kwargs['form']!r}, "
                                   f"{kwargs.get('cast')!r})")
            self.lines.append(f"    {var} = <gathers>.take({len(self.prefetched) - 1})  # {have} -> {want}, "
                              f"gathered ahead of use  ({source})")
            self.converted[key] = var
            self.made_in_block.append(key)
            return var
        self.block_collective |= mv.kind in COLLECTIVES
        if self.block in self.mixed_blocks and mv.kind in COLLECTIVES:
            raise PlanFileError(f"the plan moves {name} {have} -> {want} inside {self.block}, which only some ranks "
                                "recompute: such a block's forward may run only its weights' gathers; re-plan")
        expr = mv.code(name, src, dst, self.form(name, want), cast)  # a move without uneven forms ignores form
        self.lines.append(f"    {var} = {expr}  # {have} -> {want}  ({source})")
        self.converted[key] = var
        self.made_in_block.append(key)
        return var

    def form(self, name: str, want: Placement) -> str:
        for m in self.plan.moves:
            if m.producer == name and m.dst == str(want) and m.form:
                return m.form
        return "padded"

    def render(self, a: Any, refs: list[str], node: Node | None = None, path: str = "") -> str:
        """Argument ``a`` as code; ``node`` and ``path`` place it in the node's arguments, so a
        size that follows the batch is written in terms of the (micro-)batch the forward runs."""
        fc = node.batch_args.get(path.rstrip(".")) if node is not None else None
        if isinstance(a, Local):
            f = self.batch_factor(list(a.batch) or fc, a.size, a.unit, f"an argument of {node.name}" if node else
                                  "an argument")
            return f"{self.rows(f)}[RANK]" if f else self.len_var(a.size, a.unit)
        if isinstance(a, int) and not isinstance(a, bool) and fc and fc[0]:
            self.total_used = True
            self.defined.add("B")
            f, c = fc
            return ("B" if f == 1 else f"{f} * B") + (f" {'+' if c > 0 else '-'} {abs(c)}" if c else "")
        if is_ref(a):
            return refs.pop(0)
        if isinstance(a, dict):
            where = f"an argument of {node.name}" if node is not None else "an argument"
            key, v = next(iter(a.items())) if len(a) == 1 else (None, None)
            if key in TORCH_ATTRIBUTES:
                return f"torch.{torch_value(key, v, where)}"
            if key == "device":
                return "DEVICE"
            if key == "float" and _is_float(v):
                return f"float({v!r})"
            raise PlanFileError(f"cannot emit {where}, {a!r}: an encoded value is one of {{'node': name}}, "
                                "{'dtype' | 'memory_format' | 'layout': torch attribute}, {'device': ...} or "
                                "{'float': number}; re-plan rather than editing plan.json")
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(self.render(x, refs, node, f"{path}{i}.") for i, x in enumerate(a)) + "]"
        return repr(a)

    def call(self, node: Node, cand: Candidate, refs: list[str], args: list | None = None,
             kwargs: dict | None = None, target: str | None = None) -> str:
        fn = target or callee(node.target)
        return f"{fn}({', '.join(self.call_arguments(node, cand, refs, args, kwargs))})"

    def call_arguments(self, node: Node, cand: Candidate, refs: list[str], args: list | None = None,
                       kwargs: dict | None = None) -> list[str]:
        """The node's arguments as code, the candidate's rewrites applied."""
        args = list(node.args if args is None else args)
        for i, v in cand.rewrite:
            args[i] = v
        refs = list(refs)
        parts = [self.render(a, refs, node, f"{i}.") for i, a in enumerate(args)]
        kw = node.kwargs if kwargs is None else kwargs
        return parts + [f"{k}={self.render(v, refs, node, f'k.{k}.')}" for k, v in kw.items()]

    # ---- the forward ---------------------------------------------------------------------
    def forward_lines(self, sends: tuple[str, ...] = ()) -> list[str]:
        """The forward's lines; a pipeline stage's also returns the activations it ``sends``
        (its rows of them: the plan holds them sharded by samples)."""
        g = self.graph
        self.lines = []
        recomputed = set(getattr(self.plan, "recompute", ()))
        users = g.users() if recomputed else {}
        block, start, inside = None, 0, []
        for node in g:
            if node.kind != "op":
                continue
            if self.block_of.get(node.name) != block:
                self.end_block(block, start, inside, users, recomputed)
                block, start, inside = self.block_of.get(node.name), len(self.lines), []
                self.block, self.made_in_block, self.prefetched = block, [], []
                self.block_collective = False
            inside.append(node.name)
            cand = self.choice[node.name]
            self.block_collective |= cand.emit in FORWARD_COLLECTIVE_EMITS
            if block in self.mixed_blocks and cand.emit in FORWARD_COLLECTIVE_EMITS:
                raise PlanFileError(f"the plan runs {node.name} as {cand.emit} inside {block}, which only some ranks "
                                    "recompute: such a block's forward may run only its weights' gathers; re-plan")
            if cand.emit == "elided" or node.name in self.unwritten:  # computed by another op's rendering
                continue  # (hap.rules.token_wise: experts; hap.rules.loss: a chunked loss's chain)
            src = _text(_short_source(node.source))
            refs = [self.ref(r, p, src) for r, p in zip(node.inputs(), cand.inputs)]
            expr = self.expression(node, cand, refs)
            tag = f"{','.join(str(p) for p in cand.inputs)} -> {cand.output}" if cand.inputs else str(cand.output)
            self.lines.append(f"    {node.name} = {expr}  # {tag}  {src}")
        self.end_block(block, start, inside, users, recomputed)
        loss = g.loss
        want = Placement("P")
        var = self.ref(loss, want, "the loss: every rank holds its addend") if self.out_placement(loss) != want \
            else loss
        if sends:
            rows = [self.ref(x, Placement("S", 0), "the next stage receives each rank's rows") for x in sends]
            self.lines.append(f"    return {var}, ({', '.join(rows)},)  # the loss, and what the next stage receives")
        else:
            self.lines.append(f"    return {var}")
        return self.lines

    def end_block(self, block: str | None, start: int, names: list[str], users: dict[str, list[str]],
                  recomputed: set[str]) -> None:
        """Close the lines from ``start`` on (block ``block``'s ops, or ops outside any block): its
        weights' gathers start ahead of use (``hr.Prefetch``, made where the block starts: all of
        them then, unless the block runs other collectives, which would queue behind them; then
        each one ahead), and a recomputed block becomes its function."""
        if block is None:
            return
        if self.prefetched:
            var = "gathers_" + "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in block)
            self.defined.add(var)
            how = ("each gathered while the rank computes with the one before" if self.block_collective else
                   "all gathered one after the other while the rank computes")
            ahead = "" if self.block_collective else ", ahead=None"
            self.lines.insert(start, f"    {var} = hr.Prefetch([{', '.join(self.prefetched)}]{ahead})  # "
                                     f"{_text(block)}'s weights, {how}")
            for i in range(start + 1, len(self.lines)):
                self.lines[i] = self.lines[i].replace("<gathers>", var)
        if block in recomputed:
            self.recompute_block(block, start, names, users)

    def recompute_block(self, block: str, start: int, names: list[str], users: dict[str, list[str]]) -> None:
        """Turn the lines from ``start`` on (block ``block``'s ops) into a function that
        ``hr.recompute`` runs under activation checkpointing: it returns what later lines read."""
        inside = set(names)
        outs = [n for n in names if n == self.graph.loss or any(u not in inside for u in users[n])]
        for key in self.made_in_block:  # a conversion made inside is local to the function
            self.converted.pop(key, None)
        if not outs:
            return
        fn = "block_" + "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in block)
        self.defined.add(fn)
        # where ranks recompute different numbers of blocks, a rank keeps the activations of those after its count
        index = self.plan.recompute.index(block)
        keep = f", keep=layout.recompute_counts[RANK] <= {index}" if self.plan.recompute_counts else ""
        body = ["    " + line for line in self.lines[start:]]
        where = ", on a rank whose count passes it" if keep else ""
        self.lines[start:] = [f"    def {fn}():  # {_text(block)}: its forward runs again in backward (activation "
                              f"checkpointing){where}", *body,
                              f"        return {', '.join(outs)},",
                              f"    {', '.join(outs)}, = hr.recompute({fn}{keep})"]

    def expression(self, node: Node, cand: Candidate, refs: list[str]) -> str:
        """The right-hand side of a node's line: the ATen call with local arguments, or the
        rendering its rule's family registered for the candidate (``hap.rules.renders``). A
        random op every rank holds whole draws the same values everywhere (``hap.runtime.rng``)."""
        if node.target == "getitem":
            return f"{refs[0]}[{node.args[1]:d}]"  # check_plan_code: one ref, then an int
        if node.name in self.chunked:
            return chunked_loss(self, node, cand, refs, self.chunked[node.name])
        if cand.emit == "call" and is_random(node) and not cand.output.is_shard:
            parts = [repr(node.name), callee(node.target), *self.call_arguments(node, cand, refs),
                     "on_cpu=layout.random_on_cpu"]
            return f"hr.replicated_random({', '.join(parts)})"
        if cand.emit == "call" and self.splitter.num_ranks == 1 and mean_loss(node):
            # one rank's mean is its batch's sum over the batch's count: written so, the sums of
            # micro-batches (a pipeline stage's, or --micro-batches) add up to the batch's mean
            return RENDERERS["loss_partial"](self, node, cand, refs)
        if cand.emit == "call":
            return self.call(node, cand, refs)
        render = RENDERERS.get(cand.emit)
        if render is None:
            raise HapError(f"no rendering registered for {cand.emit!r} ({node.name}); a rule's family registers "
                           "it with @renders in hap/rules/")
        return render(self, node, cand, refs)


PRECISION_TEXT = {
    "fp32": "fp32",
    "bf16": "bf16 autocast (fp32 master weights)",
    "fp16": "fp16 autocast with dynamic loss scaling (fp32 master weights)",
}


RANDOM_OPS = {"dropout", "native_dropout", "rand_like", "randn_like", "randint_like", "bernoulli", "rand", "randn",
              "randint", "randperm", "normal", "uniform", "multinomial", "feature_dropout", "alpha_dropout"}


def is_random(node: Node) -> bool:
    return node.target.startswith("aten.") and node.target.split(".")[1].rstrip("_") in RANDOM_OPS


def _pname(p: Placement) -> str:
    return str(p).replace("(", "").replace(")", "").replace("/", "u")


def _short_source(src: str) -> str:
    return " ".join(src.split()) if src else ""


def _text(s: object) -> str:
    """``s`` as one line of printable text, for a comment of train.py: a character that is not
    printable (a line break, NUL, a lone surrogate, a control or bidi character) is written as
    its escape, so the text can neither end the comment's line nor make the file unreadable."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(s))


def _doc(s: object) -> str:
    """``s`` as text of train.py's docstring: ``_text`` with backslashes and double quotes
    escaped, so it closes no docstring and starts no escape (``\\U``, ``\\N{``); the docstring
    then reads as ``_text(s)``, and an ordinary name reads as itself."""
    return _text(s).replace("\\", "\\\\").replace('"', '\\"')


# ---- what train.py names as code ---------------------------------------------------------
def _is_name(s: object) -> bool:
    """A Python identifier that means itself: not a keyword, and in the NFKC form Python reads
    identifiers in (else "\\uff41ten", with a full-width a, would be read as aten)."""
    return isinstance(s, str) and s.isidentifier() and not keyword.iskeyword(s) and \
        unicodedata.normalize("NFKC", s) == s


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_float(x: object) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        return False
    try:
        float(x)
    except ValueError:
        return False
    return True


def op_imports(graph: Graph) -> list[str]:
    """``import`` lines for the modules that register the graph's torch.library custom ops (as
    ``torch.library.custom_op`` recorded them), so train.py can call them whether or not the spec
    imports those modules before forward runs. A module that cannot be imported by name (the
    spec itself, loaded from its path, registers its ops when train.py loads it) gets none."""
    import importlib.util

    from torch._library import custom_ops

    out = {}
    for node in graph.ops():
        parts = node.target.split(".")
        if node.target in KNOWN_TARGETS or parts[0] == "aten" or len(parts) != 3:
            continue
        opdef = custom_ops.OPDEFS.get(f"{parts[0]}::{parts[1]}")
        module = getattr(getattr(opdef, "_init_fn", None), "__module__", None)
        if not module or module == "__main__" or not all(_is_name(p) for p in module.split(".")):
            continue
        try:
            importable = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            importable = False
        if importable:
            out.setdefault(module, []).append(f"torch.ops.{parts[0]}.{parts[1]}")
    return [f"import {m}  # registers {', '.join(dict.fromkeys(ops))}" for m, ops in out.items()]


def callee(target: str) -> str:
    """The code that calls op ``target`` (checked by ``check_target``): aten's overloads through
    train.py's ``aten``, another namespace's through ``torch.ops``."""
    if target in KNOWN_TARGETS or target.startswith("aten."):
        return target
    return f"torch.ops.{target}"


def check_target(target: object, node: str) -> None:
    """Op ``target`` of ``node`` is written into train.py as the function it calls, so it is one
    hap knows: a registered overload ``torch.ops.<namespace>.<op>.<overload>`` (any namespace:
    torch.library ops too), or one of KNOWN_TARGETS. A plan.json edited to call anything else
    (``os.system``, ``builtins.eval``) is refused."""
    if target in KNOWN_TARGETS:
        return
    import torch

    parts = target.split(".") if isinstance(target, str) else []
    op = None
    if len(parts) == 3 and all(_is_name(p) for p in parts):  # dunder op names are aten's too: __and__
        try:
            op = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
        except Exception:  # noqa: BLE001 (whatever does not resolve is refused below)
            op = None
    if not isinstance(op, torch._ops.OpOverload):
        raise PlanFileError(
            f"node {node!r} calls {target!r}, which is neither a registered torch.ops overload "
            f"('<namespace>.<op>.<overload>', e.g. 'aten.mm.default') nor one of {sorted(KNOWN_TARGETS)}; "
            "train.py would run it as code, so hap refuses it: re-plan the model rather than editing plan.json")


def torch_value(kind: str, name: object, where: str) -> str:
    """``name`` of a torch dtype, memory format or layout (``torch.<name>`` in train.py)."""
    import torch

    want = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}[kind]
    if not (_is_name(name) and isinstance(getattr(torch, name, None), want)):
        raise PlanFileError(f"{where}: {name!r} is not a torch.{kind} (torch.float32, ...); "
                            "re-plan rather than editing plan.json")
    return name


def _check_ints(value: object, what: str) -> None:
    if not (isinstance(value, (list, tuple)) and all(_is_int(x) for x in value)):
        raise PlanFileError(f"{what} is {value!r}, not a list of integers; re-plan rather than editing plan.json")


def _check_locals(v: object, what: str) -> None:
    """Every Local in a candidate's rewritten argument has integer fields (train.py names them)."""
    if isinstance(v, Local):
        _check_ints([v.size, v.unit, v.scale], what)
        _check_ints(v.batch, what)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _check_locals(x, what)
    elif isinstance(v, dict):
        for x in v.values():
            _check_locals(x, what)


def check_plan_code(plan: Plan) -> None:
    """Refuse a plan whose graph would put something other than hap's own code into train.py:
    every graph name is an identifier (a local of forward) that shadows none of train.py's
    globals, every op target passes ``check_target``, every size and batch factor is an
    integer, every keyword argument name an identifier, a list element an integer index.
    Names, paths and strings elsewhere are written as data, so they need no check."""
    g = plan.graph
    for n in g:
        if not _is_name(n.name):
            raise PlanFileError(f"graph node {n.name!r} is not a Python identifier (or is a keyword); train.py "
                                "names every node as a variable of forward: re-plan, or rename the forward "
                                "argument it comes from")
        if n.name in FORWARD_GLOBALS:
            raise PlanFileError(f"graph node {n.name!r} would shadow train.py's {n.name} inside forward; rename "
                                "the forward argument it comes from and re-plan")
        for m in n.meta if isinstance(n.meta, list) else [n.meta] if n.meta is not None else []:
            _check_ints(m.shape, f"the shape of {n.name}")
        for fc in n.batch_dims:
            _check_ints(fc, f"a batch dim of {n.name}")
        for path, fc in n.batch_args.items():
            _check_ints(fc, f"batch argument {path!r} of {n.name}")
        if n.kind != "op":
            continue
        check_target(n.target, n.name)
        for k in n.kwargs:
            if not _is_name(k):
                raise PlanFileError(f"node {n.name!r} has keyword argument {k!r}, which is not an identifier; "
                                    "re-plan rather than editing plan.json")
        if n.target == "getitem" and not (len(n.args) == 2 and is_ref(n.args[0]) and _is_int(n.args[1])):
            raise PlanFileError(f"node {n.name!r} takes element {n.args[1:]!r} of {n.args[:1]!r}; a getitem "
                                "reads one integer index of a node: re-plan rather than editing plan.json")
        for _, v in plan.nodes[n.name].candidate.rewrite:
            _check_locals(v, f"a rewritten argument of {n.name}")
    if plan.precision not in PRECISION_TEXT:
        raise PlanFileError(f"precision {plan.precision!r} is not one of {sorted(PRECISION_TEXT)}")
    blocks = g.blocks()
    unknown = [b for b in plan.recompute if b not in blocks]
    if unknown:
        raise PlanFileError(f"the plan recomputes {unknown!r}, which are not blocks of the graph "
                            f"({sorted(blocks)}); re-plan rather than editing plan.json")


def check_free_names(graph: Graph, em: Emitter) -> None:
    """No graph name is also a variable or function the emitter made for forward (``n16``,
    ``rows2``, ``B``, a moved tensor's ``x__S0``, ``block_...``): one would overwrite the other."""
    clash = sorted(n.name for n in graph if n.name in em.defined)
    if clash:
        raise PlanFileError(f"graph node {clash[0]!r} has the name of a variable train.py's forward defines; "
                            "rename the forward argument it comes from and re-plan")


HEAD_TEMPLATE = '''\
"""SPMD training program for {model} on {cluster_name}, emitted by hap.

Run it (every rank runs this same file; gloo on CPU, NCCL on CUDA):
{commands}
Plan {digest}: strategy {strategy}, {precision_text}, predicted step {step_ms:.2f} ms, global batch {global_batch}.
{rank_lines}
Every node needs hap installed, this train.py, and the model spec (with the modules it
imports) at {spec_rel} relative to this file's folder: one checkout of the repository
on every node does it. plan.json is the plan's record; train.py does not read it.

No rank builds the whole model: each reads its shards of the initial state (model() built
once with --seed), which each node's first process writes to its temporary directory and
removes once read. To write it once for a job instead (one process, no torchrun), run
  python train.py --write-init DIR --seed S
and start every rank with --init DIR --seed S (DIR on a shared file system, or copied).

The forward below is the captured ATen graph over this rank's local shards. Each line
names its placements (R replicated, S(d) sharded on dim d, P partial sum) and the model
source it came from; hr.* calls are the collectives the plan chose.
"""
import torch

import hap.runtime as hr
from hap.runtime.sharded_ops import class_loss_count, embedding_bag_rows, vocab_embedding  # noqa: F401
{op_imports}
aten = torch.ops.aten
'''

LAYOUT_TEMPLATE = '''\
hr.Layout.build(
    {format},  # the layout format (hap.runtime.layout): a runtime of another format refuses this program
    spec={spec!r},  # the model spec, relative to this file
    plan_digest={digest!r},
    global_batch={global_batch},
    shares={shares},  # samples of each step's global batch per rank
    slowdown={slowdown},  # per-rank compute dilation used by --emulate (CPU emulation only)
    devices={devices},
    places={places},  # per rank: (node, local rank, processes on that node), as torchrun starts them
    # params: placeholder -> state_dict keys, sharded dim, per-rank lengths, (size, unit) they follow
    params={params},
    buffers={buffers},  # placeholder -> state_dict key
    inputs={inputs},  # per batch tensor: sharded on dim 0 by the shares (0) or replicated (None)
    input_samples={input_samples},  # per batch tensor: (shape of one sample, dtype)
    # lengths: (size, unit) -> per-rank lengths of a sharded dim that does not follow the batch
    lengths={lengths},
    micro_batches={micro},  # per rank: micro-batches its share runs in (the default of --micro-batches)
    lockstep={lockstep},  # True: forward runs collectives, so every rank runs as many micro-batches
    fixed_batch={fixed_batch!r},  # why the forward only runs whole global batches (empty: it runs any)
    random_on_cpu={random_on_cpu},  # GPU models differ: replicated random ops draw on the CPU, alike everywhere
    recompute_counts={recompute_counts},  # per rank: how many recomputed blocks it runs again; (): all
    shapes={shapes},  # state_dict key -> shape the plan was made for
    grad_buckets={grad_buckets},  # replicated params: gradients all-reduced in these buckets, in order
    grad_overlap={grad_overlap},  # True: each bucket is all-reduced during backward, as soon as it is complete
    precision={precision!r},  # forward runs under torch.autocast with this dtype (fp32: no autocast)
    optimizer={optimizer!r},  # the default of --optimizer: the optimizer whose state the plan's memory counts
    grad_reduce={grad_reduce!r},  # the dtype grad_buckets are all-reduced in
    rebalance={rebalance},  # True: the program may change the shares while it runs (measured speeds),
    # moving samples and parameter shards between ranks (hap.runtime.layout.Layout.with_shares)
)'''

FORWARD_TEMPLATE = '''\
def {name}(layout, params, buffers, batch):
    RANK, ROWS, LENGTHS, DEVICE = layout.rank, layout.rows, layout.lengths, layout.device
{unpack}
{body}'''

PIPELINE_TEMPLATE = '''\
STAGES = hr.Stages(
    ranks={ranks},  # per stage: its global ranks
    shares={stage_shares},  # per stage: its ranks' samples of each global batch
    inputs={inputs},  # per stage: the batch tensors it reads (by their index in the model's batch)
    cuts={cuts},  # per cut: the activations it hands on, (shape of one sample, dtype) each
    samples={samples},  # per batch tensor of the model: (shape of one sample, dtype)
    micro_batches={micro},  # the default of --micro-batches: every global batch runs through in this many
    schedule={schedule!r},  # each stage's order of micro-batches: 1f1b or gpipe (hap.runtime.pipeline.stage_order)
    warmup={warmup},  # 1f1b: forwards each stage runs ahead beyond its own warm-up
    shared={shared},  # weights several stages hold: (state_dict keys, stages); gradients summed across them
    partial={partial},  # per stage: its shared weights whose gradient each of its ranks holds a part of
    plan_digest={digest!r},
    places={places},  # per global rank: (node, local rank, processes on that node)
    devices={devices},
    slowdown={slowdown},
)'''

PIPELINED_MAIN_TEMPLATE = '''\
def main():
    # hap.runtime's pipelined training loop: each rank runs its stage's forward over its rows of
    # every micro-batch, handing activations on and gradients back at each cut
    hr.pipelined.main(LAYOUTS, STAGES, ({forwards}), __file__)


if __name__ == "__main__":
    main()
'''

MAIN_TEMPLATE = '''\
def main():
    hr.program.main(LAYOUT, forward, __file__)  # hap.runtime's training loop over this layout and forward


if __name__ == "__main__":
    main()
'''


def _table(lines: list[str]) -> str:
    """A dict literal of ``lines`` (its entries, one per line) inside the layout's call."""
    return "{" + "".join(f"\n{line}" for line in lines) + "\n    }" if lines else "{}"


def rebalanceable(plan: Plan) -> bool:
    """Whether shares can change at run time: every per-rank length in the forward is read from
    the layout's rows, lengths or params, which ``Layout.with_shares`` recomputes from new shares
    (the global batch stays), so any plan of more than one rank can."""
    return plan.num_ranks > 1


def lockstep(plan: Plan) -> bool:
    """Whether forward runs collectives (resharding, batch statistics, experts' all-to-alls), so that
    every rank must call it equally often; a data-parallel forward is local (its loss count is deferred)."""
    return bool(plan.moves) or any(c.emit in FORWARD_COLLECTIVE_EMITS for c in plan.choice().values())


def rank_places(plan: Plan) -> tuple[tuple[int, int, int], ...]:
    """Per rank: (node index in torchrun's --node-rank order, local rank, processes on that node)."""
    nodes = plan.cluster.nodes()  # node indices are torchrun's --node-rank order
    return tuple((r.node, nodes[r.node].index(r.rank), len(nodes[r.node])) for r in plan.cluster.ranks)


def torchrun_commands(plan: Plan, script: str) -> list[str]:
    nodes = plan.cluster.nodes()
    if len(nodes) == 1:
        return [f"torchrun --standalone --nproc-per-node {plan.num_ranks} {shlex.quote(script)} --steps 100"]
    cmds = []
    for i, ranks in enumerate(nodes):
        dev = plan.cluster.ranks[ranks[0]].device
        cmds.append(f"node {i} ({len(ranks)}x {dev}, ranks {ranks[0]}-{ranks[-1]}): torchrun --nnodes {len(nodes)} "
                    f"--node-rank {i} --nproc-per-node {len(ranks)} --master-addr $MASTER --master-port 29500 "
                    f"{shlex.quote(script)} --steps 100")
    return cmds


def check_emit_dir(out_dir: Path, force: bool) -> None:
    """The output directory must be a directory, empty unless ``force`` (then train.py and
    plan.json are overwritten, nothing else there is touched)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise HapError(f"--emit {out_dir}: this is an existing file, not a directory; the program is written "
                       f"as DIR/train.py + DIR/plan.json, so give a new or empty directory (e.g. --emit "
                       f"{out_dir.with_suffix('')}_out)")
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise HapError(f"--emit {out_dir}: {parent} is a file, so no directory can be made below it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise HapError(f"{out_dir} is not empty; choose an empty directory or pass --force to overwrite "
                       "train.py and plan.json there")


def stage_code(plan: Plan, spec_rel: str, name: str = "forward", sends: tuple[str, ...] = ()) -> tuple[str, str]:
    """The layout call and the forward function of one SPMD plan (a whole program's, or one
    pipeline stage's, whose forward also returns the activations it ``sends``)."""
    em = Emitter(plan)
    body = em.forward_lines(sends)
    g = plan.graph
    params, buffers, unpack = [], [], []
    for n in g:
        if n.kind == "param":
            p = em.out_placement(n.name)
            if p.is_shard:
                d, ls = em.shard_lengths(n.meta, p)
                params.append(f"        {n.name!r}: hr.Param({tuple(n.aliases or [n.target])!r}, {d}, {ls}, "
                              f"({n.meta.shape[d]}, {p.unit})),  # {p}")
            else:
                params.append(f"        {n.name!r}: hr.Param({tuple(n.aliases or [n.target])!r}),  # R")
            unpack.append(f"    {n.name} = params[{n.name!r}]")
        elif n.kind == "buffer":
            buffers.append(f"        {n.name!r}: {n.target!r},")
            unpack.append(f"    {n.name} = buffers[{n.name!r}]")
    inputs = [n for n in g if n.kind == "input"]
    unpack.append(f"    {', '.join(n.name for n in inputs)}{',' if len(inputs) == 1 else ''} = batch")
    lengths = [f"        ({size}, {unit}): {em.lengths(size, unit)}," for size, unit in sorted(em.length_keys)]
    lens_lines = [f"    {var} = LENGTHS[{size}, {unit}][RANK]  # this rank's part of a dim of {size}"
                  for (size, unit), var in sorted(em.lengths_used.items())]
    lens_lines += [f"    rows{f} = tuple({f} * n for n in ROWS)  # per-rank lengths of a dim of {f} per sample"
                   for f in sorted(em.rows_used)]
    if em.total_used:
        lens_lines.append("    B = sum(ROWS)  # samples in this (micro-)batch, over all ranks")
    input_dims = [0 if em.out_placement(n.name).is_shard else None for n in inputs]
    check_free_names(g, em)
    layout = LAYOUT_TEMPLATE.format(
        digest=plan.digest(), global_batch=plan.global_batch,
        spec=spec_rel, shares=tuple(plan.shares),
        slowdown=tuple(r.slowdown for r in plan.cluster.ranks),
        devices=tuple(r.device for r in plan.cluster.ranks), places=rank_places(plan),
        format=LAYOUT_FORMAT, params=_table(params), buffers=_table(buffers), inputs=tuple(input_dims),
        input_samples=tuple((tuple(n.meta.shape[1:]), n.meta.dtype) for n in inputs),
        lengths=_table(lengths),
        grad_buckets=tuple(tuple(b) for b in plan.predicted.grad_buckets) or (tuple(plan.grad_synced),),
        grad_overlap=plan.predicted.grad_overlap, precision=plan.precision, optimizer=plan.optimizer,
        grad_reduce=plan.graph.grad_reduce, rebalance=rebalanceable(plan),
        micro=tuple(plan.micro_batches) or (1,) * plan.num_ranks, lockstep=lockstep(plan) or bool(sends),
        fixed_batch=tuple(dict.fromkeys(em.fixed_batch)),
        random_on_cpu=len({r.device for r in plan.cluster.ranks if r.device != "cpu"}) > 1,
        recompute_counts=tuple(plan.recompute_counts),
        shapes={k: tuple(n.meta.shape) for n in g if n.kind in ("param", "buffer") and isinstance(n.meta, TensorMeta)
                for k in (n.aliases or [n.target])},
    )
    return layout, FORWARD_TEMPLATE.format(name=name, unpack="\n".join(unpack + lens_lines), body="\n".join(body))


def head_text(plan: Plan, spec_rel: str, script: str, graphs: list[Graph]) -> str:
    # the docstring's user-supplied text (names, paths) goes through _doc, the code's through repr
    rank_lines = "\n".join(
        _doc(f"  rank {r.rank}: {r.device} (node {r.node}), {plan.shares[r.rank]} samples/step")
        for r in plan.cluster.ranks)
    imports = list(dict.fromkeys(line for g in graphs for line in op_imports(g)))
    return HEAD_TEMPLATE.format(
        model=_doc(plan.graph.model_name), cluster_name=_doc(plan.cluster.name),
        commands="\n".join(_doc("  " + c) for c in torchrun_commands(plan, script)),
        digest=plan.digest(), strategy=_doc(plan.strategy), step_ms=plan.predicted_step_s * 1e3,
        global_batch=plan.global_batch, rank_lines=rank_lines, spec_rel=_doc(spec_rel),
        precision_text=PRECISION_TEXT[plan.precision], op_imports="".join(f"{line}\n" for line in imports))


def single_program(plan: Plan, spec_rel: str, script: str) -> str:
    layout, forward = stage_code(plan, spec_rel)
    return (head_text(plan, spec_rel, script, [plan.graph]) + "LAYOUT = " + layout + "\n\n\n" + forward + "\n\n\n"
            + MAIN_TEMPLATE)


def pipelined_program(plan: Plan, spec_rel: str, script: str) -> str:
    """One train.py for every stage: a layout and a forward per stage, and the stages' table
    (``hap.runtime.pipelined``): which ranks run which, what crosses each cut."""
    layouts, forwards = [], []
    for i, st in enumerate(plan.stages):
        layout, forward = stage_code(st.plan, spec_rel, f"forward_{i}", st.sends)
        layouts.append("    " + layout.replace("\n", "\n    ") + ",")
        forwards.append(forward)
    cuts = []
    for st in plan.stages[:-1]:
        metas = [st.plan.graph[x].out for x in st.sends]
        cuts.append(tuple((tuple(m.shape[1:]), m.dtype) for m in metas))
    samples = tuple((tuple(n.meta.shape[1:]), n.meta.dtype) for n in plan.graph if n.kind == "input")
    shared = tuple(shared_weights([st.plan.graph for st in plan.stages]).items())  # a tied embedding and head
    keys = {k for ks, _ in shared for k in ks}
    partial = tuple(tuple(sorted(shared_in(st.plan.graph, keys) & set(st.plan.grad_synced))) for st in plan.stages)
    stages = PIPELINE_TEMPLATE.format(
        ranks=tuple(st.ranks for st in plan.stages), stage_shares=tuple(tuple(st.plan.shares) for st in plan.stages),
        inputs=tuple(st.inputs for st in plan.stages),
        cuts=tuple(cuts), samples=samples, micro=plan.micro_batches[0] if plan.micro_batches else 1,
        schedule=plan.schedule.name if plan.schedule else "1f1b", warmup=plan.schedule.warmup if plan.schedule else 0,
        shared=shared, partial=partial, digest=plan.digest(), places=rank_places(plan),
        devices=tuple(r.device for r in plan.cluster.ranks), slowdown=tuple(r.slowdown for r in plan.cluster.ranks))
    return (head_text(plan, spec_rel, script, [st.plan.graph for st in plan.stages])
            + "LAYOUTS = (  # per pipeline stage: its plan, over its ranks (numbered from 0 within the stage)\n"
            + "\n".join(layouts) + "\n)\n" + stages + "\n\n\n" + "\n\n\n".join(forwards) + "\n\n\n"
            + PIPELINED_MAIN_TEMPLATE.format(forwards=", ".join(f"forward_{i}" for i in range(len(plan.stages)))
                                             + ("," if len(plan.stages) == 1 else "")))


def emit_program(plan: Plan, out_dir: Path, spec: str | None, force: bool = False) -> Path:
    if not spec:
        raise HapError("emitting a program needs the model spec file it imports: plan.emit(dir, spec='model.py')")
    from hap.runtime.checks import backend_for

    try:
        backend_for([r.device for r in plan.cluster.ranks])
    except ValueError as e:
        raise HapError(f"cannot emit a program for {plan.cluster.name}: {e}") from None
    spec_path = Path(spec).resolve()
    if not spec_path.exists():
        raise HapError(f"model spec {spec} does not exist")
    check_emit_dir(out_dir, force)
    for p in [st.plan for st in plan.stages] or [plan]:
        check_plan_code(p)
    # the spec is found relative to train.py, so the program runs on any node with the same layout
    spec_rel = Path(os.path.relpath(spec_path, out_dir.resolve())).as_posix()
    script = os.path.relpath(out_dir / "train.py")  # from where hap-plan ran: no path of this machine
    text = (pipelined_program(plan, spec_rel, script) if plan.pipelined else
            single_program(plan, spec_rel, script))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.py").write_text(text, encoding="utf-8")  # the encoding Python reads source in
    (out_dir / "plan.json").write_text(json.dumps(dataclasses.replace(plan, spec=str(spec_path)).to_json(), indent=1))
    return out_dir / "train.py"


