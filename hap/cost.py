"""The cost model: compute time of a node's candidate on each rank, the time of the
collective that moves a tensor between placements (padded or grouped form), gradient
synchronisation of replicated parameters, and memory per rank.

Compute: a node's work on rank ``r`` is its share of the split dimension times the whole
op's work; matmul-like classes (matmul, conv, attention) run at the device's achieved
FLOP rate for the dtype, memory-bound classes at its memory bandwidth; every kernel
costs at least the device's floor. Backward is 2x forward for matmul-like ops and 1x
for the rest; nodes that need no gradient have no backward.

Communication (α-β over the link the collective is bound by: the network when the
ranks span machines, else the intra-node link): latency terms plus the bytes the busiest
rank sends or receives in hap.runtime's implementation over β (``hap.machine.wire_bytes``,
which lists them per collective and form; ``tests/test_moves.py`` checks them against the
bytes the implementation hands to the backend).
A forward collective's backward is its dual (all-gather ↔ reduce-scatter, all-reduce ↔
all-reduce, all-to-all ↔ reverse all-to-all); R→S and R→P are free both ways.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hap.cluster import Cluster
    from hap.plan import Plan
from hap import optimer
from hap.graph import SHORT_DTYPE, Graph, Node, TensorMeta
from hap.machine import collective_s  # noqa: F401  (priced here; tests and the profiler import it from hap.machine)
from hap.moves import UNEVEN_KINDS, move
from hap.placement import Placement, Splitter
from hap.rules import Candidate
from hap.rules.loss import chunked_losses
from hap.runtime.chunked_loss import CHUNK_ELEMENTS, CHUNKED_ABOVE

MATMUL_LIKE = ("matmul", "conv", "attention")
GRAD_BUCKET_BYTES = 25 * 2**20  # gradient buckets, as DDP's default: on 64 ranks a 4 MiB bucket is α-bound
# the bucket sizes a plan chooses among where its buckets overlap backward (solve.grad_sync_schedule)
BUCKET_CAPS = (1 * 2**20, 4 * 2**20, GRAD_BUCKET_BYTES, 100 * 2**20)
OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
INF = float("inf")

# What autograd keeps for backward, by op (the memory model's rule): ops that keep none of
# their tensors (their backward needs only shapes), ops that keep only their output; every
# other op on the gradient path keeps its inputs (matmuls both operands, mul the other factor,
# silu / pow / norms their input), as PyTorch's derivative formulas do. An op not named here
# keeps its inputs: an unknown op is priced as the more expensive case.
KEEPS_NOTHING = {"aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar", "aten.neg.default",
                 "aten.to.dtype", "aten._to_copy.default", "aten.to.dtype_layout", "aten.to.device",
                 "aten.cat.default", "aten.clone.default", "aten.sum.dim_IntList", "aten.sum.default",
                 "aten.mean.dim", "aten.mean.default", "aten.rsub.Scalar", "aten.stack.default",
                 "aten.type_as.default", "aten.copy.default", "aten.dropout.default"}
KEEPS_OUTPUT = {"aten.exp.default", "aten.tanh.default", "aten.sigmoid.default", "aten.rsqrt.default",
                "aten.sqrt.default", "aten.relu.default", "aten.softmax.int", "aten._softmax.default",
                "aten.log_softmax.int", "aten._log_softmax.default"}
KEEPS_OUTPUT_AND_INPUTS = {"aten.scaled_dot_product_attention.default"}  # q, k, v, and out (+ logsumexp)


@dataclass(frozen=True)
class PricedMove:
    """How a tensor moves from placement ``src`` to ``dst``: forward collective, its form, cost."""

    kind: str  # "none" | "slice" | "partial" | "all_gather" | "all_reduce" | "reduce_scatter" | "all_to_all"
    form: str  # "padded" | "grouped" | ""
    seconds: float  # forward + backward
    forward_s: float = 0.0  # of which the forward collective


@dataclass(frozen=True)
class CostSetup:
    """What a graph and cluster are priced under in one attempt of the search, in a baseline and
    in a plan's replay: the integer batch share of every rank, the optimizer (its state per
    parameter), per rank the micro-batches its share runs in (() is one each), the blocks
    (``Graph.blocks``) recomputed in backward with, per rank, how many of them (the first ones)
    it recomputes (() is all, on every rank; a rank keeps the others' activations and only joins
    their weights' gathers again in backward, ``hap.runtime.ops.recompute``), and the bytes every
    rank keeps free for a
    collective's temporary buffer (a row of the solve's memory constraint; no figure of an
    evaluated plan depends on it). The precision is the graph's: ``hap.precision.training_graph``
    gives every node its dtype."""

    shares: tuple[int, ...]
    optimizer: str = "sgd"
    micro_batches: tuple[int, ...] = ()
    recompute: tuple[str, ...] = ()
    collective_reserve: float = 0.0
    recompute_counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shares", tuple(self.shares))
        micro = tuple(self.micro_batches)
        object.__setattr__(self, "micro_batches", micro if micro and max(micro) > 1 else ())
        object.__setattr__(self, "recompute", tuple(self.recompute))
        counts = tuple(min(int(k), len(self.recompute)) for k in self.recompute_counts)
        object.__setattr__(self, "recompute_counts",
                           counts if any(k < len(self.recompute) for k in counts) else ())

    @classmethod
    def of_plan(cls, plan: Plan) -> CostSetup:
        """The setup ``plan`` is priced under (a plan keeps no collective reserve: see above)."""
        return cls(plan.shares, plan.optimizer, plan.micro_batches, plan.recompute,
                   recompute_counts=plan.recompute_counts)

    def cost_model(self, graph: Graph, cluster: Cluster) -> CostModel:
        return CostModel(graph, cluster, Splitter(self.shares), self.optimizer, self.micro_batches, self.recompute,
                         self.collective_reserve, self.recompute_counts)


class CostModel:
    """The cost model of ``graph`` on ``cluster``; hap builds it from a ``CostSetup``."""

    def __init__(self, graph: Graph, cluster: Cluster, splitter: Splitter, optimizer: str = "sgd",
                 micro_batches: tuple[int, ...] = (), recompute: tuple[str, ...] = (),
                 collective_reserve: float = 0.0, recompute_counts: tuple[int, ...] = ()) -> None:
        assert splitter.num_ranks == cluster.num_ranks
        self.graph = graph
        self.cluster = cluster
        self.splitter = splitter
        self.n = cluster.num_ranks
        # per rank: micro-batches its share runs in. Activations that follow the batch are kept
        # for the largest micro-batch only; every op launches once per micro-batch
        self.micro = tuple(micro_batches) or (1,) * self.n
        self.micro_scale = tuple(-(-s // k) / s if s else 1.0 for s, k in zip(splitter.shares, self.micro))
        self.collective_reserve = collective_reserve  # bytes kept free on every rank for a collective's temporaries
        self.link = cluster.group_link()
        self.opt_states = OPTIMIZER_STATES.get(optimizer, 2)
        self.requires_grad = graph.requires_grad()
        self.grad_wire = 0.5 if graph.grad_reduce == "bf16" else 1.0  # bytes sent per gradient byte
        self.cast_copies = _cast_copies(graph)
        self.saved = saved_for_backward(graph, self.requires_grad)
        # a chunked cross-entropy (hap.rules.loss.chunked_losses), on a rank whose logits are more
        # than one chunk, keeps the logits for its backward and nothing between them and the loss,
        # and runs its chunks' forward again in backward; elsewhere it is torch's loss, as the graph
        self.chunked = chunked_losses(graph)
        self.unkept = {name for c in self.chunked.values() for name in c.chain}
        self.chunked_on = {name: self._chunked_ranks(graph, c) for name, c in self.chunked.items()}
        self._loss_part = {x: (name, x == c.logits) for name, c in self.chunked.items() for x in (*c.chain, c.logits)}
        self._node_cache: dict[tuple[str, str], tuple[float, ...]] = {}
        self._move_cache: dict[tuple, tuple[float, ...] | None] = {}
        self._price_cache: dict[tuple, PricedMove] = {}
        self._step_move_cache: dict[tuple, PricedMove] = {}
        self._readers = graph.users()
        self._first_reader = {name: users[0] for name, users in self._readers.items() if users}
        self.low_gathers = low_precision_gathers(graph)
        # ranks of one device type and slowdown compute alike: identical ranks are priced once
        self.rank_class = tuple((info.device, info.slowdown) for info in cluster.ranks)
        self._memory_cache: dict[tuple[str, str], dict[str, tuple[float, ...]]] = {}
        self._bytes_cache: dict[tuple[str, str], tuple[float, ...]] = {}
        self._recompute(graph, recompute, recompute_counts)
        self.transient_peak = self._transient_peak(graph)

    @property
    def activation_reserve(self) -> tuple[float, ...]:
        """Per rank, activation bytes no node's choice holds but the step needs at its peak: the
        block backward recomputes, and the largest transient output with its gradient."""
        return tuple(a + b for a, b in zip(self.recompute_peak, self.transient_peak))

    def _chunked_ranks(self, graph: Graph, c) -> tuple[bool, ...]:
        """Per rank, whether its logits (of its largest micro-batch) are many enough for
        ``hap.runtime.chunked_loss`` to run in chunks (``CHUNKED_ABOVE``)."""
        meta, total = graph[c.logits].out, self.splitter.total or 1
        return tuple(meta.numel * (s / total * m if graph[c.logits].follows_batch else 1.0) > CHUNKED_ABOVE
                     for s, m in zip(self.splitter.shares, self.micro_scale))

    def _transient_peak(self, graph: Graph) -> tuple[float, ...]:
        """Per rank, twice the largest output of an op on the gradient path, at the rank's
        data-parallel fraction of its largest micro-batch: an output that is not kept still lives
        while its reader runs, and in backward beside its gradient; or a chunked loss's peak, if
        larger."""
        total = self.splitter.total or 1

        def largest(skip) -> tuple[float, float]:
            """The largest output that follows the batch and the largest that does not."""
            sizes = [(node.follows_batch, node.meta.nbytes) for node in graph.ops()
                     if node.name in self.requires_grad and node.op_class != "view"
                     and isinstance(node.meta, TensorMeta) and node.name not in skip]
            return (max((b for f, b in sizes if f), default=0.0), max((b for f, b in sizes if not f), default=0.0))

        batch, fixed = largest(())
        # a rank that chunks a loss reserves that loss's peak apart from its logits and chain
        batch_rest, fixed_rest = largest(self._loss_part) if self._loss_part else (batch, fixed)
        out = []
        for r in range(self.n):
            frac = self.splitter.shares[r] / total * self.micro_scale[r]
            # a chunked loss's backward: the logits (saved, counted as such) beside their gradient and
            # one chunk's fp32 copy, log-softmax and their two gradients
            losses = [graph[c.logits].out.nbytes * (frac if graph[c.logits].follows_batch else 1.0)
                      + 16 * CHUNK_ELEMENTS for name, c in self.chunked.items() if self.chunked_on[name][r]]
            if losses:
                out.append(max(2 * max(batch_rest * frac, fixed_rest), *losses))
            else:
                out.append(2 * max(batch * frac, fixed))
        return tuple(out)

    def _recompute(self, graph: Graph, blocks: tuple[str, ...], counts: tuple[int, ...]) -> None:
        """Activation checkpointing of ``blocks`` (``Graph.blocks``), rank r recomputing the first
        ``counts[r]`` of them (() is all): there their ops run forward again in backward; of
        their activations only what is read outside the block stays saved, and while backward
        recomputes one block its activations are back (the largest block, at the rank's
        data-parallel fraction, is reserved in its memory). On every rank a recomputed block's
        forward collectives (its weights' gathers) run again in backward: the ranks that keep
        the block join them there."""
        self.recompute = tuple(blocks)
        self.recompute_counts = tuple(counts) or (len(blocks),) * self.n
        self.recomputed: set[str] = set()  # on some rank
        self.recomputed_on: dict[str, tuple[bool, ...]] = {}  # node -> per rank, whether it recomputes it
        self.recomputed_mixed: set[str] = set()
        self.dropped: set[str] = set()
        self.recompute_peak = (0.0,) * self.n
        if not blocks:
            return
        users, all_blocks = graph.users(), graph.blocks()
        total = self.splitter.total or 1
        peaks = [0.0] * self.n
        for i, b in enumerate(blocks):
            names = all_blocks[b]
            inside = set(names)
            on = tuple(i < k for k in self.recompute_counts)
            self.recomputed |= inside
            self.recomputed_on.update((x, on) for x in names)
            self.dropped |= {x for x in names if x != graph.loss and all(u in inside for u in users[x])}
            saved = [graph[x] for x in names if x in self.saved and isinstance(graph[x].meta, TensorMeta)]
            for r in range(self.n):
                if on[r]:
                    frac = self.splitter.shares[r] / total * self.micro_scale[r]
                    peaks[r] = max(peaks[r], sum(x.meta.nbytes * (frac if x.follows_batch else 1.0) for x in saved))
        self.recompute_peak = tuple(peaks)
        # where some ranks recompute a block and others keep it, its forward may run no collective
        # but its weights' gathers: the only ones the ranks that keep it join again
        self.recomputed_mixed = {x for x, on in self.recomputed_on.items() if any(on) and not all(on)}

    def again_factor(self, node: Node) -> tuple[float, ...]:
        """Per rank, what ``node`` costs as a multiple of its one forward and backward: its
        forward's share more where that forward runs again in backward (its block recomputed on
        that rank, or its chunked loss run in chunks there), else 1."""
        if node.name in self.recomputed:
            on = self.recomputed_on[node.name]
        elif node.name in self.chunked:
            on = self.chunked_on[node.name]
        else:
            return (1.0,) * self.n
        again = 1.0 + 1.0 / (1.0 + self.backward_factor(node))
        return tuple(again if x else 1.0 for x in on)

    def forward_backward_s(self, node: Node, cand: Candidate) -> tuple[float, float]:
        """The slowest rank's forward seconds of ``node`` and its backward seconds (with its forward
        again where it is recomputed), from ``compute_s``."""
        t, bwd = self.compute_s(node, cand), self.backward_factor(node)
        fwd = [x / f / (1 + bwd) for x, f in zip(t, self.again_factor(node))]
        return max(fwd), max(x - f for x, f in zip(t, fwd))

    # ---- compute -------------------------------------------------------------------
    def fractions(self, split: tuple[int, int] | None) -> tuple[float, ...]:
        if split is None:
            return (1.0,) * self.n
        return self.splitter.fractions(*split)

    def compute_s(self, node: Node, cand: Candidate) -> tuple[float, ...]:
        """Forward + backward seconds of ``node`` under ``cand`` on every rank."""
        key = (node.name, cand.name)
        if key in self._node_cache:
            return self._node_cache[key]
        if node.kind == "input" and isinstance(node.meta, TensorMeta):
            # reading the batch: a rank reads its own samples (S) or all of them (R), in host
            # memory, and a GPU rank copies them over its host link (PCIe)
            fracs = self.fractions(cand.split)
            res = tuple(node.meta.nbytes * f / (self.cluster.profile(r).host_bytes_per_s
                                                 or self.cluster.profile(r).memory_bytes_per_s)
                        for r, f in enumerate(fracs))
        elif node.kind == "param" and isinstance(node.meta, TensorMeta):
            # the optimizer step of this rank's part: zero_grad writes the gradient, the update
            # reads weight and gradient and writes the weight, each state tensor is read and written;
            # a replicated parameter's gradient also goes into the flat all-reduce bucket
            fracs = self.fractions(cand.split)
            passes = 4 + 2 * self.opt_states
            if cand.split is None and self.n > 1 and node.name in self.requires_grad:
                passes += 2  # the gradient is copied into its all-reduce bucket (and then viewed there)
            # (not dilated by an emulated slowdown, which slows the model's forward + backward only)
            res = tuple(node.meta.nbytes * f * passes / self.cluster.profile(r).memory_bytes_per_s
                        for r, f in enumerate(fracs))
        elif node.kind != "op" or node.op_class == "view":
            res = (0.0,) * self.n
        else:
            fracs = self.fractions(cand.split)
            res = []
            alike: dict[tuple, float] = {}  # a roofline's seconds depend only on (class, fraction, pieces)
            for r, k in enumerate(self.micro):
                same = None if self._measures(node, cand, r) else (self.rank_class[r], fracs[r], k)
                if same in alike:
                    res.append(alike[same])
                    continue
                work, fixed = self._affine_s(node, r)
                t = self._measured_s(node, cand, r, work * fracs[r] + fixed, fracs[r])
                # k micro-batches: k runs of the op on a k-th of the batch
                res.append(self._micro_s(node, cand, r, k, t + (k - 1) * fixed) if k > 1 else t)
                if same is not None:
                    alike[same] = res[-1]
            res = [t * f for t, f in zip(res, self.again_factor(node))]  # with its forward run again in backward
            if cand.emit == "experts":  # the call's pairs go to their experts' ranks and back
                res = [t + self.experts_exchange_s(cand) for t in res]
            res = tuple(res)
        self._node_cache[key] = res
        return res

    def backward_factor(self, node: Node) -> float:
        """Backward work of a node as a multiple of its forward: 2 for matmul-like ops (gradients of
        both operands), 1 for the rest, 0 without a gradient path."""
        if node.name not in self.requires_grad:
            return 0.0
        return 2.0 if node.op_class in MATMUL_LIKE else 1.0

    def _affine_s(self, node: Node, r: int) -> tuple[float, float]:
        """The roofline of an op node on rank r: (seconds of the whole op's work, fixed seconds)."""
        grad = node.name in self.requires_grad
        bwd = self.backward_factor(node)
        if node.op_class in MATMUL_LIKE:
            t = node.flops / self.cluster.flop_rate(r, node.op_class, _dtype_of(node))
        else:
            t = node.bytes / self.cluster.memory_rate(r)
        kernels = 1 + (1 if grad else 0)
        return t * (1 + bwd), kernels * self.cluster.kernel_floor(r)

    def _measures(self, node: Node, cand: Candidate | None, r: int) -> bool:
        """Whether ``node`` is timed on this machine for rank ``r``: every op but views and creations
        (their own dispatch and autograd overhead is most of a small op's time), as the program
        calls it (no rewritten arguments, no special emit), not too slow to time."""
        return (node.kind == "op" and node.op_class not in ("view", "creation") and self.cluster.profile(r).measure_ops
                and (cand is None or (cand.emit == "call" and not cand.rewrite))
                and optimer.estimate_ok(node.flops, self.cluster.profile(r).compute_rate(node.op_class, "fp32"))
                and optimer.estimate_ok(node.bytes, self.cluster.profile(r).memory_bytes_per_s))

    def _timed(self, node: Node, shapes: dict[str, tuple[int, ...]], r: int) -> float | None:
        t = optimer.time_node(self.graph, node, shapes, self.requires_grad, node.name in self.requires_grad)
        return None if t is None else t * self.cluster.ranks[r].slowdown

    def whole_s(self, node: Node, r: int) -> float:
        """Seconds of the whole (unsharded) op on rank r: timed where measured, else the roofline's work."""
        if self._measures(node, None, r):
            metas = {n: self.graph[n].meta for n in node.inputs()}
            if all(isinstance(m, TensorMeta) for m in metas.values()):
                t = self._timed(node, {n: m.shape for n, m in metas.items()}, r)
                if t is not None:
                    return t
        return self._affine_s(node, r)[0]

    def _local_shapes(self, node: Node, cand: Candidate, r: int, k: int = 1) -> dict[str, tuple[int, ...]] | None:
        """The shapes rank r's inputs to the op have under ``cand`` (with ``k`` micro-batches:
        the dims that follow the batch cut k ways), or None where they cannot be told."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, p in zip(node.inputs(), cand.inputs):
            src = self.graph[name]
            if not isinstance(src.meta, TensorMeta):
                return None
            shape = optimer.local_shape(src.meta, p, lambda size, unit: self.splitter.lengths(size, unit)[r])
            if shape is not None and k > 1:
                shape = tuple(-(-n // k) if src.batch_dims and src.batch_dims[d][0] else n for d, n in enumerate(shape))
            if shape is None or shapes.get(name, shape) != shape:
                return None
            shapes[name] = shape
        return shapes

    def _measured_s(self, node: Node, cand: Candidate, r: int, roofline: float, frac: float) -> float:
        """Seconds of an op node on rank r timed at its local shapes (``hap.optimer``) where the
        rank's profile asks for it, between its share of the whole op and the whole op; else
        ``roofline``."""
        shapes = self._local_shapes(node, cand, r) if self._measures(node, cand, r) else None
        t = None if shapes is None else self._timed(node, shapes, r)
        if t is None:
            # a share that cannot be timed as it runs (a rewritten loss, say) does at least its
            # share of the whole op's timed work, as the lower bound counts it
            return max(roofline, frac * self.whole_s(node, r)) if self._measures(node, None, r) else roofline
        # a share of an op costs at least its share of the whole op and at most the whole op:
        # single timings scatter 10-20%, enough to time a share above the whole
        whole = self.whole_s(node, r)
        return min(max(t, frac * whole), whole)

    def _micro_s(self, node: Node, cand: Candidate, r: int, k: int, roofline: float) -> float:
        """Seconds of the op on rank r run as ``k`` micro-batches: timed at the micro-batch's
        shapes where the rank's profile asks for it, times k; else ``roofline`` (the whole
        share's work plus k kernel floors)."""
        shapes = self._local_shapes(node, cand, r, k) if self._measures(node, cand, r) else None
        t = None if shapes is None else self._timed(node, shapes, r)
        return roofline if t is None else k * t

    def affine_s(self, node: Node, cand: Candidate, r: int) -> tuple[float, float]:
        """(a, b) with the node's seconds on rank r ~ a x + b when the rank holds a fraction x of
        the split dim: the roofline's, or the secant through the measured local and whole op;
        with its forward again in backward where the rank recomputes it (``again_factor``)."""
        again = self.again_factor(node)[r]
        a, b = self._affine_s(node, r)
        if not self._measures(node, cand, r):
            return a * again, b * again
        f = self.fractions(cand.split)[r]
        local = self.compute_s(node, cand)[r]
        whole = self.whole_s(node, r) * again
        if f >= 0.98:
            return whole, 0.0
        slope = max((whole - local) / (1.0 - f), 0.0)
        return slope, max(whole - slope, 0.0)

    def experts_exchange_s(self, cand: Candidate) -> float:
        """The all-to-alls of an expert-parallel call (``hap.runtime.experts``) in forward and
        backward: each (token, choice) pair's hidden row to its expert's rank and its result back,
        the busiest rank's bytes at the slowest link; routing taken as even over the experts."""
        x, idx, _, _, _, experts, *_ = cand.extra
        pairs = self.graph[x].out.nbytes * self.graph[idx].out.shape[-1]
        tokens, owners = self.fractions(cand.split), self.splitter.fractions(experts)
        one = collective_s("all_to_all", pairs, tokens, self.link, "grouped", owners)
        back = collective_s("all_to_all", pairs, owners, self.link, "grouped", tokens)
        return 2 * (one + back)  # forward: dispatch and combine; backward: their duals

    def node_s(self, node: Node, cand: Candidate) -> float:
        return max(self.compute_s(node, cand))

    # ---- communication ---------------------------------------------------------------
    def _fr(self, meta: TensorMeta, p: Placement) -> tuple[float, ...]:
        d = p.dim if p.dim >= 0 else p.dim + meta.ndim
        return self.splitter.fractions(meta.shape[d], p.unit)

    def price_move(self, meta: TensorMeta, src: Placement, dst: Placement, grad: bool = True,
                   form: str | None = None) -> PricedMove:
        """What moving a tensor of ``meta`` from ``src`` to ``dst`` costs, in ``form`` or the
        cheaper of its forms (memoised: a repeated block's tensors ask the same)."""
        key = (meta.shape, meta.dtype, src, dst, grad, form)
        if key not in self._price_cache:
            self._price_cache[key] = _price_move(self, meta, src, dst, grad, form)
        return self._price_cache[key]

    def moved_meta(self, node: Node, src: Placement, dst: Placement) -> TensorMeta:
        """What moving ``node``'s output from ``src`` to ``dst`` moves forward: a weight gathered for
        autocast matmuls moves its low-precision copy (``low_precision_gathers``), the rest itself."""
        low = self.low_gathers.get(node.name) if weight_gather(node, src, dst) else None
        return node.meta if low is None else TensorMeta(node.meta.shape, low)

    def run_move(self, node: Node, src: Placement, dst: Placement) -> PricedMove:
        """One run of moving ``node``'s output from ``src`` to ``dst``: ``price_move``, with the
        forward moving ``moved_meta`` (a weight's low-precision copy) and the backward fp32."""
        assert isinstance(node.meta, TensorMeta), node.name
        one = self.price_move(node.meta, src, dst, node.name in self.requires_grad)
        sent = self.moved_meta(node, src, dst)
        if sent is node.meta:
            return one
        fwd = self.price_move(sent, src, dst, False, one.form).seconds
        return PricedMove(one.kind, one.form, one.seconds - one.forward_s + fwd, fwd)

    def step_move(self, node: Node, src: Placement, dst: Placement) -> PricedMove:
        """What moving ``node``'s output from ``src`` to ``dst`` costs in one step, as the program
        runs it (``run_move`` prices one run): in lockstep every rank runs the largest number of
        micro-batches, each moving a tensor that does not follow the batch (a parameter's shards,
        say) whole again, while one that follows it moves a micro-batch's rows each time (the same
        bytes in all, the latencies aside); a move whose first reader is in a recomputed
        block is emitted inside that block, so its forward collective runs again in backward."""
        key = (node.name, src, dst)
        if key not in self._step_move_cache:
            rounds, rerun = self.move_runs(node)
            one = self.run_move(node, src, dst)
            again = one.forward_s if rerun else 0.0
            self._step_move_cache[key] = PricedMove(one.kind, one.form, rounds * (one.seconds + again),
                                                    rounds * one.forward_s)  # the re-run is in backward
        return self._step_move_cache[key]

    def kept_move_bytes(self, node: Node, src: Placement, dst: Placement) -> tuple[float, ...]:
        """Per rank, the bytes that moving ``node``'s output from ``src`` to ``dst`` keeps until
        backward: a weight gathered whole (``moved_meta``) is saved by a reader that keeps its
        inputs (a matmul), unless that rank recomputes the reader's block (its gathers are then
        made again in backward, one block at a time). Only weights are counted: a moved
        activation's bytes are its producer's."""
        zero = (0.0,) * self.n
        if not weight_gather(node, src, dst) or node.name not in self.requires_grad:
            return zero
        if all(self.graph[u].target in KEEPS_NOTHING | KEEPS_OUTPUT for u in self._readers[node.name]):
            return zero
        whole = float(self.moved_meta(node, src, dst).nbytes)
        on = self.recomputed_on.get(self._first_reader.get(node.name), (False,) * self.n)
        return tuple(0.0 if x else whole for x in on)

    def move_runs(self, node: Node) -> tuple[int, bool]:
        """How often a move of ``node``'s output runs whole in a step (``step_move``), and whether
        its forward collective runs again in backward (its first reader is recomputed)."""
        rounds = 1 if node.follows_batch else max(self.micro)
        return rounds, self._first_reader.get(node.name) in self.recomputed

    def measured_move_s(self, meta: TensorMeta, src: Placement, dst: Placement, form: str,
                        grad: bool) -> tuple[float, ...] | None:
        """Per rank, the timed local work of moving ``meta`` from ``src`` to ``dst`` (forward +
        backward if ``grad``), where every rank's profile asks for measured ops; else None."""
        if not all(self.cluster.profile(r).measure_ops for r in range(self.n)):
            return None
        slowest_memory = min(self.cluster.profile(r).memory_bytes_per_s for r in range(self.n))
        if not optimer.estimate_ok(8 * meta.nbytes, slowest_memory):
            return None
        key = (meta.shape, meta.dtype, src, dst, form, grad)
        if key not in self._move_cache:
            lengths = {}
            for p in (src, dst):
                if p.kind == "S":
                    d = p.dim if p.dim >= 0 else p.dim + meta.ndim
                    lengths[d] = self.splitter.lengths(meta.shape[d], p.unit)
            out = [optimer.time_move(meta, src, dst, form, lengths, r, self.n, grad) for r in range(self.n)]
            self._move_cache[key] = None if any(t is None for t in out) else tuple(out)
        return self._move_cache[key]

    def grad_sync_s(self, meta: TensorMeta) -> float:
        """The MILP's additive proxy of a replicated parameter's gradient all-reduce: the bandwidth
        term plus a latency per GRAD_BUCKET_BYTES it fills (``grad_sync_latency_s`` is the first).
        ``solve.evaluate`` then schedules the real buckets, overlapped with backward where it can."""
        if self.n <= 1:
            return 0.0
        a, bw = self.link.for_collective("all_reduce")
        lat = 2 * (self.n - 1) * a * meta.nbytes / GRAD_BUCKET_BYTES
        return lat + 2 * (self.n - 1) / self.n * meta.nbytes * self.grad_wire / bw

    def grad_sync_latency_s(self) -> float:
        """Latency of the first gradient bucket, paid once when any parameter is replicated."""
        return 2 * (self.n - 1) * self.link.for_collective("all_reduce")[0] if self.n > 1 else 0.0

    def all_reduce_s(self, nbytes: float) -> float:
        """One all-reduce of ``nbytes`` over all ranks."""
        return collective_s("all_reduce", nbytes, (1 / self.n,) * self.n, self.link, "")

    def grad_bucket_s(self, nbytes: float) -> float:
        """The all-reduce of a bucket holding ``nbytes`` of fp32 gradients, in the graph's ``grad_reduce`` dtype."""
        return self.all_reduce_s(nbytes * self.grad_wire)

    # ---- memory ----------------------------------------------------------------------
    def memory_bytes(self, node: Node, cand: Candidate) -> tuple[float, ...]:
        """Bytes per rank this node's choice keeps: parameter state, or saved activations."""
        key = (node.name, cand.name)
        if key not in self._bytes_cache:
            self._bytes_cache[key] = tuple(sum(parts) for parts in zip(*self.memory_parts(node, cand).values()))
        return self._bytes_cache[key]

    def memory_parts(self, node: Node, cand: Candidate) -> dict[str, tuple[float, ...]]:
        """Per rank: parameters, gradients, optimizer state, activations (inputs and saved outputs)."""
        key = (node.name, cand.name)
        if key not in self._memory_cache:
            self._memory_cache[key] = self._memory_parts(node, cand)
        return self._memory_cache[key]

    def _memory_parts(self, node: Node, cand: Candidate) -> dict[str, tuple[float, ...]]:
        zero = (0.0,) * self.n
        parts = {"parameters": zero, "gradients": zero, "optimizer": zero, "activations": zero}
        meta = node.meta if isinstance(node.meta, TensorMeta) else None
        if meta is None:
            return parts
        p = cand.output
        fr = self._fr(meta, p) if p.is_shard else (1.0,) * self.n
        local = tuple(meta.nbytes * f for f in fr)
        if node.kind == "param":
            parts["parameters"] = local
            parts["gradients"] = local
            if not p.is_shard and self.n > 1 and node.name in self.requires_grad:
                # a replicated gradient is all-reduced from a persistent bucket, which holds the
                # last step's sum while backward writes this step's fresh gradient
                parts["gradients"] = tuple(2 * x for x in local)
            parts["optimizer"] = tuple(x * self.opt_states for x in local)
            if node.name in self.cast_copies:  # autocast's low-precision copy, saved for backward
                parts["activations"] = tuple(x * self.cast_copies[node.name] for x in local)
        elif node.kind == "buffer":
            parts["parameters"] = (float(meta.nbytes),) * self.n
        elif node.kind == "input" or node.name in self.saved or node.name in self._loss_part:
            kept = tuple(x * m for x, m in zip(local, self.micro_scale)) if node.follows_batch else local
            if node.name in self.dropped:  # recomputed in backward, not saved (the peak is reserved apart)
                kept = tuple(0.0 if on else x for x, on in zip(kept, self.recomputed_on[node.name]))
            if node.name in self._loss_part:  # a chunked loss keeps its logits and nothing of its chain
                loss, is_logits = self._loss_part[node.name]
                whole = node.name in self.saved
                kept = tuple(x if (is_logits if on else whole) else 0.0 for x, on in zip(kept, self.chunked_on[loss]))
            parts["activations"] = kept
        return parts

    def move_temporary_bytes(self, meta: TensorMeta, src: Placement, dst: Placement, conv: PricedMove) -> float:
        """Bytes a collective allocates while it runs, on every rank: a padded form's buffer of N
        shards of the largest length, a grouped form's whole output; a local move none. An
        all-to-all's pieces are a rank's own: the grouped form packs its shard and receives
        its new one, the padded form sends and receives N of the largest piece."""
        if conv.kind not in UNEVEN_KINDS:
            return 0.0
        if conv.kind == "all_to_all":
            fs, fd = self._fr(meta, src), self._fr(meta, dst)
            if conv.form != "padded":
                return max(a + 2 * b for a, b in zip(fs, fd)) * meta.nbytes  # packed, received, assembled
            same_dim = src.dim % meta.ndim == dst.dim % meta.ndim
            piece = min(max(fs), max(fd)) if same_dim else max(fs) * max(fd)
            return (2 * self.n * piece + max(fd)) * meta.nbytes
        if conv.form != "padded":
            return float(meta.nbytes)
        fr = self._fr(meta, src if src.kind == "S" and conv.kind != "reduce_scatter" else dst)
        return self.n * max(fr) * meta.nbytes

    def batch_activations(self, node: Node, cand: Candidate) -> tuple[float, ...]:
        """Per rank, the activation bytes of this node that micro-batches divide (0 for the rest)."""
        if not (node.follows_batch and self.graph.batch_size):
            return (0.0,) * self.n
        return self.memory_parts(node, cand)["activations"]


def saved_for_backward(graph: Graph, requires_grad: set[str]) -> set[str]:
    """The op nodes whose output autograd keeps until backward (``KEEPS_NOTHING``, ``KEEPS_OUTPUT``):
    an op on the gradient path keeps its output or its inputs; a kept view keeps the tensor it
    views (its first input, through views), and parameters, buffers and inputs are counted as
    such, not here."""
    def base(name: str) -> str:
        node = graph[name]
        while node.kind == "op" and node.op_class == "view" and node.inputs():
            node = graph[node.inputs()[0]]
        return node.name

    kept: set[str] = set()
    for node in graph.ops():
        if node.name not in requires_grad or node.op_class == "view" or node.target in KEEPS_NOTHING:
            continue
        if node.target in KEEPS_OUTPUT or node.target in KEEPS_OUTPUT_AND_INPUTS:
            kept.add(node.name)
        if node.target not in KEEPS_OUTPUT:
            kept.update(base(ref) for ref in node.inputs())
    return {x for x in kept if graph[x].kind == "op"}


def weight_gather(node: Node, src: Placement, dst: Placement) -> bool:
    """Whether the move of ``node`` from ``src`` to ``dst`` is a weight's all-gather: a block of the
    program starts it one ahead of its use (``hap.runtime.Prefetch``), and backward leaves its
    reduce-scatter running (``hap.runtime.collectives.deferred_grads``)."""
    return node.kind == "param" and dst.kind == "R" and move(src, dst).kind == "all_gather"


def low_precision_gathers(graph: Graph) -> dict[str, str]:
    """Parameters whose every reader is a matmul-class op that autocast runs in a low dtype, with
    that dtype: a gather of such a parameter moves the low-precision copy autocast would make
    (``hap.runtime.all_gather(..., cast=)``), half the bytes of fp32, and trains the same values."""
    if graph.precision == "fp32":
        return {}
    users = graph.users()
    out: dict[str, str] = {}
    for p in graph.params():
        readers = [graph[u] for u in users[p.name]]
        low = {r.meta.dtype for r in readers if isinstance(r.meta, TensorMeta)}
        if (isinstance(p.meta, TensorMeta) and p.meta.dtype == "float32" and readers and len(low) == 1
                and low <= {"bfloat16", "float16"} and all(r.op_class in MATMUL_LIKE for r in readers)):
            out[p.name] = low.pop()
    return out


def _cast_copies(graph: Graph) -> dict[str, float]:
    """Parameters that autocast copies into the low dtype for a matmul-class reader (the copy is
    saved for backward), with the copy's bytes per byte of the fp32 parameter."""
    if graph.precision == "fp32":
        return {}
    out: dict[str, float] = {}
    for node in graph.ops():
        m = node.meta if isinstance(node.meta, TensorMeta) else None
        if node.op_class in MATMUL_LIKE and m is not None and m.dtype in ("bfloat16", "float16"):
            for ref in node.inputs():
                p = graph[ref]
                if p.kind == "param" and isinstance(p.meta, TensorMeta) and p.meta.dtype == "float32":
                    out[ref] = 0.5
    return out


def _local_work_s(cm: CostModel, kind: str, nbytes: float, fs: tuple[float, ...],
                  fd: tuple[float, ...] | None, r: int) -> float:
    """A formula for a collective's local work on rank r at full speed (padding, packing and
    unpacking copies through memory, a few kernels), one direction."""
    prof = cm.cluster.profile(r)
    if kind == "all_to_all":
        moved = 2 * (max(fs) + max(fd or fs)) * nbytes
    elif kind == "all_reduce":
        moved = 2 * nbytes
    else:  # all-gather / reduce-scatter: pack n pieces of the largest shard, unpack the whole
        moved = 2 * (nbytes + cm.n * max(fs) * nbytes)
    return moved / prof.memory_bytes_per_s + 4 * prof.kernel_floor_s


def _local_extra_s(cm: CostModel, meta: TensorMeta, src: Placement, dst: Placement, conv: PricedMove,
                   fs: tuple[float, ...], fd: tuple[float, ...] | None, grad: bool) -> float:
    """What a collective's local work adds to its α-β wire time (forward + backward). hap-profile's
    α-β hold that work at full speed for the layouts it measured (dim-0 shards), about the formula
    of ``_local_work_s``. The work runs at the rank's speed, so a rank ``s`` times slower adds
    ``(s - 1)`` times it, and the collective waits for the slowest rank. Where the profiles ask for
    measured ops (``measure_ops``) the work is timed at this tensor's shape, split and placements
    (``hap.optimer.time_move``): a rank adds ``s x`` its measured work less what the α-β hold."""
    passes = 2 if grad else 1
    formula = [_local_work_s(cm, conv.kind, meta.nbytes, fs, fd, r) * passes for r in range(cm.n)]
    measured = cm.measured_move_s(meta, src, dst, conv.form, grad)
    if measured is None:
        return max((cm.cluster.ranks[r].slowdown - 1.0) * formula[r] for r in range(cm.n))
    worst = max(cm.cluster.ranks[r].slowdown * measured[r] for r in range(cm.n))
    return max(0.0, worst - min(formula))


def _price_move(cm: CostModel, meta: TensorMeta, src: Placement, dst: Placement, grad: bool,
                form: str | None = None) -> PricedMove:
    conv = _wire_price(cm, meta, src, dst, grad, form)
    if not move(src, dst).is_collective:
        return conv
    fs = cm._fr(meta, src) if src.kind == "S" else (1 / cm.n,) * cm.n
    fd = cm._fr(meta, dst) if dst.kind == "S" else None
    if conv.kind == "reduce_scatter":
        fs = fd or fs
    extra = _local_extra_s(cm, meta, src, dst, conv, fs, fd, grad)  # forward and backward alike
    return PricedMove(conv.kind, conv.form, conv.seconds + extra, conv.forward_s + (extra / 2 if grad else extra))


def _wire_price(cm: CostModel, meta: TensorMeta, src: Placement, dst: Placement, grad: bool,
                form: str | None = None) -> PricedMove:
    """The α-β wire time of ``move(src, dst)``: forward, plus its dual in backward if ``grad``,
    in ``form``, or the cheaper of its forms (by forward time)."""
    mv = move(src, dst)
    if not mv.is_collective:
        return PricedMove(mv.kind, "", 0.0)
    f = cm._fr(meta, src) if src.is_shard else None
    g = cm._fr(meta, dst) if dst.is_shard else None
    forward = (f or g or (1 / cm.n,) * cm.n, g)  # (the sharded side's fractions, the other side's)
    backward = (g, f) if mv.kind == "all_to_all" else forward  # the reverse all-to-all

    def wire(kind: str, fracs: tuple, form: str) -> float:
        return collective_s(kind, meta.nbytes, fracs[0], cm.link, form, fracs[1])

    if form not in mv.forms:
        form = min(mv.forms, key=lambda fm: wire(mv.kind, forward, fm))
    fwd = wire(mv.kind, forward, form)
    return PricedMove(mv.kind, form, fwd + (wire(mv.backward, backward, form) if grad else 0.0), fwd)


def _dtype_of(node: Node) -> str:
    m = node.meta if isinstance(node.meta, TensorMeta) else (node.meta[0] if node.meta else None)
    return SHORT_DTYPE.get(m.dtype, "fp32") if m is not None else "fp32"
