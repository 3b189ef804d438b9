"""The captured program as a plain, JSON-round-trippable artifact.

A ``Graph`` is the ATen-level forward of ``loss = model(*batch)``: placeholders for
parameters, buffers and batch inputs, one ``Node`` per ATen call, and the loss. Node
arguments are JSON: literals, lists, ``{"node": name}`` references, ``{"dtype": ..}``
and ``{"device": ..}``. Everything downstream (rules, cost, solve, emit) reads this
artifact, never ``fx.Node`` objects.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

DTYPE_BYTES = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8,
}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str

    @functools.cached_property
    def numel(self) -> int:
        return math.prod(self.shape)

    @functools.cached_property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float32", "float64", "float16", "bfloat16")


@dataclass
class Node:
    name: str
    kind: str  # "param" | "buffer" | "input" | "op"
    target: str  # ATen overload ("aten.linear.default"), "getitem", or the state_dict key / input index
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    meta: TensorMeta | list[TensorMeta] | None = None
    op_class: str = "view"  # matmul | conv | attention | pointwise | reduction | norm | view | creation
    flops: float = 0.0  # forward FLOPs of the whole (unsharded) op
    bytes: float = 0.0  # forward bytes read + written by the whole op
    source: str = ""  # "examples/gpt.py:40  q, k, v = self.qkv(...)"
    module: str = ""  # "blocks.0.qkv (Linear)"
    aliases: list[str] = field(default_factory=list)  # params: every state_dict key of this tensor (tied weights)
    # how sizes follow the global batch B (hap.capture.classify_batch): per dim of the (first)
    # output [f, c] with size f*B + c (f == 0: a fixed size), and for shape arguments, their
    # path ("1.0": args[1][0]; "k.size": kwargs["size"]) -> [f, c]; empty when not classified
    batch_dims: list = field(default_factory=list)
    batch_args: dict = field(default_factory=dict)
    # the module whose call this op runs in when that module is token-wise (each token's output
    # depends only on that token's inputs: hap.capture.is_token_wise), "" otherwise; the ops of one
    # such call run together on each rank's own tokens (hap.rules.token_wise)
    token_wise: str = ""

    def inputs(self) -> list[str]:
        """Names of the tensor nodes this node reads, in argument order (with repeats)."""
        return list(iter_refs(self.args)) + list(iter_refs(list(self.kwargs.values())))

    @property
    def follows_batch(self) -> bool:
        """Whether the node's (first) output has a dim that grows with the global batch (a batch
        input always; other nodes as ``batch_dims`` says, so never in an unclassified graph)."""
        return self.kind == "input" or any(f for f, _ in self.batch_dims)

    @property
    def out(self) -> TensorMeta:
        assert isinstance(self.meta, TensorMeta), f"{self.name} has no single tensor output"
        return self.meta

    def to_json(self) -> dict:
        d = asdict(self)
        if isinstance(self.meta, list):
            d["meta"] = [asdict(m) for m in self.meta]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Node:
        d = dict(d)
        m = d.get("meta")
        if isinstance(m, list):
            d["meta"] = [TensorMeta(tuple(x["shape"]), x["dtype"]) for x in m]
        elif isinstance(m, dict):
            d["meta"] = TensorMeta(tuple(m["shape"]), m["dtype"])
        return cls(**d)


def iter_refs(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        if "node" in obj and len(obj) == 1:
            yield obj["node"]
        else:
            for v in obj.values():
                yield from iter_refs(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_refs(v)


def decode_arg(a: Any, values: Mapping[str, Any], device: Any = None) -> Any:
    """A node argument as the Python value an ATen call takes: ``{"node": n}`` is ``values[n]``,
    ``{"dtype"|"memory_format"|"layout": x}`` is ``torch.x``, ``{"device": ..}`` is ``device``
    (default CPU), ``{"float": r}`` is the float (the encodings ``hap.capture`` writes)."""
    import torch

    if isinstance(a, dict) and len(a) == 1:  # an encoded value has exactly one key
        (key, v), = a.items()
        if key == "node":
            return values[v]
        if key in ("dtype", "memory_format", "layout"):
            return getattr(torch, v)
        if key == "device":
            return torch.device("cpu") if device is None else device
        if key == "float":
            return float(v)
    if isinstance(a, dict):  # keyword arguments
        return {k: decode_arg(v, values, device) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(decode_arg(x, values, device) for x in a)
    return a


def resolve_target(target: str) -> Any:
    """The callable of a node's target: ``operator.getitem``, ``torch.tensor`` (a literal
    constant), or the ATen overload ``torch.ops.<ns>.<op>.<overload>``."""
    import operator

    import torch

    if target == "getitem":
        return operator.getitem
    if target == "torch.tensor":  # a literal constant made inside forward
        return torch.tensor
    obj = torch.ops
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


PRODUCT_OPS = {"aten.mul.Tensor", "aten.div.Tensor", "aten.mm.default", "aten.matmul.default", "aten.bmm.default",
               "aten.einsum.default", "aten.pow.Tensor_Tensor"}


@dataclass
class Graph:
    nodes: list[Node]
    loss: str  # name of the node holding the scalar loss
    num_inputs: int
    model_name: str = ""
    precision: str = "fp32"  # the autocast dtype the node metas describe (hap.precision.autocast_graph)
    grad_reduce: str = "fp32"  # the dtype replicated parameters' gradients are all-reduced in
    batch_size: int = 0  # the global batch the nodes' batch_dims / batch_args refer to (0: not classified)
    # token-wise module calls (Node.token_wise) whose experts can be sharded: path -> what the
    # expert-parallel program needs to run them (hap.capture.expert_parallel_form)
    experts: dict = field(default_factory=dict)
    # batch inputs that carry a gradient: a pipeline stage's activations from the stage before
    # (hap.stages), whose gradient its backward sends back
    differentiable_inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}

    def __getitem__(self, name: str) -> Node:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def ops(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == "op"]

    def params(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == "param"]

    def global_batch(self) -> int | None:
        """The global batch: dim 0 of the first batch input (None without a tensor input of
        at least one dim). Every share vector of a plan sums to it."""
        first = next((n for n in self.nodes if n.kind == "input"), None)
        if first is None or not isinstance(first.meta, TensorMeta) or not first.meta.shape:
            return None
        return first.meta.shape[0]

    def users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in dict.fromkeys(n.inputs()):
                out[i].append(n.name)
        return out

    def requires_grad(self) -> set[str]:
        """Nodes whose value depends on a parameter (or a ``differentiable_inputs`` input) through
        float ops: they have a backward."""
        out: set[str] = set()
        for n in self.nodes:
            if n.kind == "param" or n.name in self.differentiable_inputs:
                out.add(n.name)
            elif n.kind == "op" and any(i in out for i in n.inputs()):
                m = n.meta if isinstance(n.meta, TensorMeta) else (n.meta[0] if n.meta else None)
                if m is not None and m.is_float and n.target not in ("aten.detach.default",):
                    out.add(n.name)
        return out

    def blocks(self) -> dict[str, list[str]]:
        """The model's repeated blocks, the units activation checkpointing recomputes: label ->
        op nodes in order. A block is an item of a module list (``blocks.3``, ``model.layers.0``:
        the module path up to its first integer); a block whose ops are interleaved with others
        is split into contiguous runs (``blocks.3``, ``blocks.3#2``)."""
        out: dict[str, list[str]] = {}
        runs: dict[str, int] = {}  # label -> contiguous runs of it so far
        current = last = None
        for n in self.ops():
            path = n.module.split(" (")[0].split(".") if n.module else []
            cut = next((i for i, part in enumerate(path) if part.isdigit()), None)
            label = ".".join(path[:cut + 1]) if cut is not None else None
            if label is not None and label != last:
                runs[label] = runs.get(label, 0) + 1
                current = label if runs[label] == 1 else f"{label}#{runs[label]}"
                out[current] = []
            if label is not None:
                out[current].append(n.name)
            last = label
        return out

    def batch_products(self) -> list[str]:
        """Ops that multiply (or divide) two statistics of the whole batch, e.g. a router's
        load-balancing loss (the fraction of tokens each expert takes times its mean router
        probability). Such a loss is not a sum over samples, so micro-batches, which add up the
        pieces' losses, would train something else. A statistic is a float tensor computed from
        the batch whose sizes do not follow it; the ops of a token-wise call are its own."""
        if not self.batch_size:
            return []
        from_batch: set[str] = set()
        out = []
        for n in self.nodes:
            if n.kind == "input" or (n.kind == "op" and any(i in from_batch for i in n.inputs())):
                from_batch.add(n.name)
            if n.kind != "op" or n.token_wise or n.target not in PRODUCT_OPS:
                continue
            stats = {i for i in n.inputs() if i in from_batch and not self[i].follows_batch
                     and isinstance(self[i].meta, TensorMeta) and self[i].meta.is_float}
            if len(stats) >= 2:
                out.append(n.source or n.name)
        return list(dict.fromkeys(out))

    def block_of(self) -> dict[str, str]:
        """Each op node inside a block (``blocks``): its block's label."""
        return {name: b for b, names in self.blocks().items() for name in names}

    def to_json(self) -> dict:
        return {"model_name": self.model_name, "loss": self.loss, "num_inputs": self.num_inputs,
                "precision": self.precision, "grad_reduce": self.grad_reduce, "batch_size": self.batch_size,
                "experts": self.experts, "nodes": [n.to_json() for n in self.nodes],
                **({"differentiable_inputs": list(self.differentiable_inputs)} if self.differentiable_inputs else {})}

    @classmethod
    def from_json(cls, d: dict) -> Graph:
        g = cls([Node.from_json(x) for x in d["nodes"]], d["loss"], d["num_inputs"], d.get("model_name", ""),
                d.get("precision", "fp32"), d.get("grad_reduce", "fp32"), d.get("batch_size", 0),
                dict(d.get("experts", {})), tuple(d.get("differentiable_inputs", ())))
        g.lint()
        return g

    def lint(self) -> None:
        """Raise CaptureError unless every node reads only earlier nodes and the loss is a scalar."""
        from hap.errors import CaptureError

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise CaptureError(f"graph of {self.model_name or 'the model'}: {what}")

        seen: set[str] = set()
        for n in self.nodes:
            need(n.name not in seen, f"duplicate node {n.name}")
            for i in n.inputs():
                need(i in seen, f"{n.name} reads {i} before it is defined")
            seen.add(n.name)
        need(self.loss in seen, f"loss {self.loss} is not a node")
        loss = self[self.loss].meta
        need(isinstance(loss, TensorMeta) and loss.shape == (), "the loss must be a scalar")
