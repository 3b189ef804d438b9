"""Capture: a single-device model and its loss → an ATen ``Graph``.

``torch.export`` traces ``loss = model(*batch)`` into its training IR (high-level ATen
ops such as ``aten.linear``, ``aten.layer_norm``, ``aten.scaled_dot_product_attention``
that autograd can differentiate eagerly). Every node gets its shape, dtype, forward
FLOPs and bytes, an op class for the cost model, and the model source line it came
from. Plain ``torch.fx.symbolic_trace`` cannot trace HuggingFace models; export can.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import operator
import os
import re
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from hap.errors import CaptureError
from hap.graph import Graph, Node, TensorMeta

log = logging.getLogger(__name__)

MATMUL_OPS = {"aten.linear.default", "aten.mm.default", "aten.bmm.default", "aten.matmul.default",
              "aten.addmm.default", "aten.baddbmm.default", "aten.einsum.default", "aten.addbmm.default"}
# grouped matmuls (one matmul per expert over its rows of a sorted input): input [S, k],
# weight [E, k, n] -> [S, n]; transformers routes experts through its fallback custom op
# where torch's own grouped_mm cannot run (under export with fp32 weights)
GROUPED_MM_OPS = {"aten._grouped_mm.default", "transformers.grouped_mm_fallback.default"}
CONV_OPS = {"aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.convolution.default",
            "aten.conv_transpose2d.input"}
ATTENTION_OPS = {"aten.scaled_dot_product_attention.default"}
VIEW_OPS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.permute.default",
            "aten.transpose.int", "aten.t.default", "aten.expand.default", "aten.unsqueeze.default",
            "aten.squeeze.dim", "aten.squeeze.default", "aten.squeeze.dims", "aten.flatten.using_ints",
            "aten.unflatten.int", "aten.slice.Tensor", "aten.select.int", "aten.split.Tensor",
            "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int", "getitem",
            "aten.alias.default", "aten.detach.default", "aten.contiguous.default", "aten.view_as.default",
            "aten.expand_as.default", "aten.broadcast_tensors.default", "aten.unsqueeze_.default",
            "aten.lift_fresh_copy.default", "aten.movedim.int", "aten.swapaxes.default"}
CREATION_OPS = {"aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.zeros.default",
                "aten.ones.default", "aten.full.default", "aten.empty.memory_format", "aten.scalar_tensor.default",
                "aten.zeros_like.default", "aten.ones_like.default", "aten.full_like.default",
                "aten.tril.default", "aten.triu.default", "torch.tensor"}
NORM_OPS = {"aten.layer_norm.default", "aten.batch_norm.default", "aten.group_norm.default",
            "aten.rms_norm.default", "aten.native_layer_norm.default", "aten.instance_norm.default"}
REDUCTION_WORDS = ("sum", "mean", "amax", "amin", "max", "min", "softmax", "log_softmax", "loss", "norm",
                   "var", "std", "logsumexp", "cumsum", "topk", "argmax", "argmin", "prod", "any", "all")


def op_class(target: str) -> str:
    if target in MATMUL_OPS or target in GROUPED_MM_OPS:
        return "matmul"
    if target in CONV_OPS:
        return "conv"
    if target in ATTENTION_OPS:
        return "attention"
    if target in VIEW_OPS:
        return "view"
    if target in CREATION_OPS:
        return "creation"
    if target in NORM_OPS:
        return "norm"
    base = target.split(".")[1] if target.startswith("aten.") else target
    if any(w in base for w in REDUCTION_WORDS):
        return "reduction"
    return "pointwise"


def _meta_of(val: Any) -> TensorMeta | list[TensorMeta] | None:
    if isinstance(val, torch.Tensor):
        return TensorMeta(tuple(int(s) for s in val.shape), str(val.dtype).removeprefix("torch."))
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return [TensorMeta(tuple(int(s) for s in v.shape), str(v.dtype).removeprefix("torch.")) for v in val]
    return None


def _encode(a: Any, where: str) -> Any:
    if isinstance(a, torch.fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return [_encode(x, where) for x in a]
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if a is None or isinstance(a, (bool, int, float, str)):
        if isinstance(a, float) and not math.isfinite(a):
            return {"float": repr(a)}
        return a
    raise CaptureError(f"{where}: argument {a!r} of type {type(a).__name__} cannot be recorded; "
                       "pass it as a tensor or a plain Python number instead")


def _user_frame(stack_trace: str | None) -> str:
    """The innermost frame of the stack trace that is the user's code, as 'file:line  code'."""
    if not stack_trace:
        return ""
    lines = stack_trace.strip().splitlines()
    frames = []
    for i, line in enumerate(lines):
        m = re.match(r'\s*File "([^"]+)", line (\d+), in (\S+)', line)
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append((m.group(1), int(m.group(2)), code))
    for path, lineno, code in reversed(frames):
        if f"{os.sep}torch{os.sep}" in path or f"{os.sep}transformers{os.sep}" in path or path.startswith("<"):
            continue  # library code, and code torch generates (<eval_with_key>)
        return f"{_short_path(path)}:{lineno}  {code}"
    if frames:
        path, lineno, code = frames[-1]
        return f"{_short_path(path)}:{lineno}  {code}"
    return ""


def _short_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else path
    except ValueError:
        return path


def _unrenderable(target: object, where: str) -> str:
    """Why an op of the exported graph cannot be written into train.py, and what to do."""
    name = getattr(target, "__name__", None) or str(target)
    kind = ("a higher-order op (control flow, checkpointing or a kernel wrapper, with subgraphs of its own)"
            if isinstance(target, torch._ops.HigherOrderOperator) else f"a {type(target).__name__}")
    return (f"cannot capture the model: the op {name!r} at {where} is {kind}; train.py calls every op of the "
            "graph through torch.ops (aten's and any torch.library custom op), which this one is not.\n"
            "  fix: write that part with tensor ops (torch.where for torch.cond), or wrap it in a custom op: "
            "torch.library.custom_op with register_fake and register_autograd")


def _module_path(raw: object) -> str:
    """A module's path as ``named_modules`` writes it, from an ``nn_module_stack`` entry."""
    path = re.sub(r"L\['self'\]\.?", "", str(raw))
    return re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "").strip(".")


def _module_of(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw, cls = list(stack.values())[-1]
    path = _module_path(raw)
    cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return f"{path} ({cls_name})" if path else cls_name


def is_token_wise(module: torch.nn.Module) -> bool:
    """Whether each output row of ``module`` depends only on the same row of its inputs, so a rank
    can run it on its own tokens whatever ops it is made of. These are transformers' experts
    modules (``use_experts_implementation``: forward(hidden_states [tokens, d], top_k_index,
    top_k_weights) sends every token through its chosen experts with no capacity limit, so no
    token is dropped for another's sake), when transformers has not sharded them itself."""
    return hasattr(module, "is_concatenated") and getattr(module, "_is_expert_parallel", None) is False


EXPERT_ACTIVATIONS = ("silu", "gelu", "relu", "gelu_pytorch_tanh")  # hap.runtime.experts.ACTIVATIONS


def expert_parallel_form(module: torch.nn.Module) -> dict | str:
    """What running transformers' experts ``module`` with its experts sharded needs (its expert
    count and activation), or why hap cannot: the expert-parallel program computes each expert as
    the grouped-matmul path does (gate and up in one weight, activation of the gate times the up,
    no bias, no norm after), and no other form."""
    from transformers.integrations import moe

    config = getattr(module, "config", None)
    act = getattr(config, "hidden_act", None)
    checks = [
        (getattr(config, "_experts_implementation", None) == "grouped_mm", "it does not run the grouped-matmul path"),
        (module.has_gate and module.is_concatenated and not module.is_transposed,
         "its gate and up weights are not one [experts, 2 x ffn, hidden] tensor"),
        (not module.has_bias and not module.has_post_expert_norm, "it adds a bias or a norm to its experts"),
        (getattr(type(module)._apply_gate, "__code__", None) is moe._default_apply_gate.__code__,
         "it gates in its own way"),
        (act in EXPERT_ACTIVATIONS, f"its activation {act!r} is not one of {', '.join(EXPERT_ACTIVATIONS)}"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    return {"experts": int(module.num_experts), "act": act}


def _token_wise_of(n: torch.fx.Node, paths: set[str]) -> str:
    """The outermost token-wise module (of ``paths``) whose call the node runs in, or ""."""
    for raw, _ in (n.meta.get("nn_module_stack") or {}).values():
        path = _module_path(raw)
        if path in paths:
            return path
    return ""


def count_flops(target: str, ins: Sequence[TensorMeta | None], out: TensorMeta | list | None, args) -> float:
    outs = out if isinstance(out, list) else [out] if out is not None else []
    out_numel = sum(o.numel for o in outs)
    if target == "aten.linear.default":
        k = ins[0].shape[-1]
        return 2.0 * out_numel * k
    if target in ("aten.mm.default", "aten.bmm.default", "aten.matmul.default", "aten.addmm.default",
                  "aten.baddbmm.default", "aten.addbmm.default"):
        a = ins[1] if target.startswith("aten.add") or target == "aten.baddbmm.default" else ins[0]
        return 2.0 * out_numel * (a.shape[-1] if a.ndim else 1)
    if target == "aten.einsum.default":
        eq = args[0].replace(" ", "")
        lhs = eq.split("->")[0].split(",")
        sizes: dict[str, int] = {}
        for sub, t in zip(lhs, [m for m in ins if m is not None]):
            if "." in sub:
                return 2.0 * out_numel * 1
            for ch, s in zip(sub, t.shape):
                sizes[ch] = s
        return 2.0 * math.prod(sizes.values())
    if target in GROUPED_MM_OPS:  # every row meets one expert's [k, n] weight
        return 2.0 * out_numel * ins[0].shape[-1]
    if target in CONV_OPS:
        w = ins[1]
        return 2.0 * out_numel * math.prod(w.shape[1:])
    if target in ATTENTION_OPS:
        q, k, v = ins[0], ins[1], ins[2]
        batch = math.prod(q.shape[:-2])
        return 2.0 * batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return float(out_numel)


def capture(model: torch.nn.Module, example_batch: Sequence[torch.Tensor], name: str = "") -> Graph:
    """Trace ``model(*example_batch)`` (which must return the scalar loss) into a ``Graph``."""
    if not isinstance(example_batch, (tuple, list)):
        example_batch = (example_batch,)
    example_batch = tuple(example_batch)
    for i, b in enumerate(example_batch):
        if not isinstance(b, torch.Tensor):
            raise CaptureError(f"batch element {i} is a {type(b).__name__}, not a tensor; "
                               "batch(step, batch_size) must return a tuple of tensors")
    try:
        ep = torch.export.export(model, example_batch, strict=False)
    except Exception as e:  # export raises many types; turn them into one clear message
        raise CaptureError(_explain_export_failure(e)) from e
    graph = _graph_from_export(_inlined(ep), model, name or type(model).__name__)
    # the same model at twice the batch tells which sizes follow the batch (micro-batches run
    # the program at other batch sizes); a model that does not export at 2B keeps fixed sizes
    doubled = tuple(torch.cat([b, b]) for b in example_batch)
    try:
        twice = _graph_from_export(_inlined(torch.export.export(model, doubled, strict=False)), model, graph.model_name)
    except Exception as e:  # export raises many types: the plan then runs whole batches only
        log.info("the model does not capture at twice the batch (%s): micro-batches are off", e)
        return graph
    return classify_batch(graph, twice, int(example_batch[0].shape[0]))


def _inlined(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    if any(n.op == "get_attr" for n in ep.graph.nodes):
        # no_grad / autocast regions (HuggingFace rotary embeddings run under @torch.no_grad) are
        # exported as higher-order ops over submodules; an empty decomposition table inlines them
        # and keeps the high-level ATen ops
        ep = ep.run_decompositions({})
    return ep


# ops whose integer arguments are sizes: a size that follows the batch is rewritten per
# (micro-)batch; any other integer (a user's `loss / batch_size`) keeps the global batch's value
SIZE_ARG_OPS = VIEW_OPS | CREATION_OPS | {
    "aten.new_zeros.default", "aten.new_ones.default", "aten.new_empty.default", "aten.new_full.default",
    "aten.repeat.default", "aten.narrow.default", "aten.empty.memory_format", "aten.randn.default",
    "aten.rand.default", "aten.randint.low", "aten.randint.default"}


def classify_batch(graph: Graph, twice: Graph, batch: int) -> Graph:
    """Mark, from captures at batch B and 2B, each output dim and size argument as f*B + c
    (``Node.batch_dims``, ``Node.batch_args``). Graphs that differ in anything but sizes, or a
    size that is not an integer multiple of B plus a constant, leave the graph unclassified."""
    if [(n.name, n.target) for n in graph] != [(n.name, n.target) for n in twice]:
        log.info("the graphs at batch %d and %d differ: micro-batches are off", batch, 2 * batch)
        return graph

    def affine(a: int, b: int) -> list[int] | None:
        if (b - a) % batch:
            return None
        f = (b - a) // batch
        return [f, a - f * batch]

    nodes = []
    for n, m in zip(graph, twice):
        one = n.meta[0] if isinstance(n.meta, list) and n.meta else n.meta
        two = m.meta[0] if isinstance(m.meta, list) and m.meta else m.meta
        dims = []
        if isinstance(one, TensorMeta) and isinstance(two, TensorMeta):
            if one.ndim != two.ndim:
                return graph
            dims = [affine(a, b) for a, b in zip(one.shape, two.shape)]
            if None in dims:
                return graph
        sizes: dict[str, list[int]] = {}
        if n.target in SIZE_ARG_OPS or n.token_wise:  # a token-wise call runs on each rank's rows
            for path, a, b in _int_pairs(n.args, m.args, "") + _int_pairs(n.kwargs, m.kwargs, "k."):
                if a != b:
                    fc = affine(a, b)
                    if fc is None:
                        return graph
                    sizes[path] = fc
        nodes.append(dataclasses.replace(n, batch_dims=dims, batch_args=sizes))
    return dataclasses.replace(graph, nodes=nodes, batch_size=batch)


def _int_pairs(a: Any, b: Any, path: str) -> list[tuple[str, int, int]]:
    """(path, value at B, value at 2B) of every integer in two argument structures."""
    if isinstance(a, bool) or isinstance(b, bool):
        return []
    if isinstance(a, int) and isinstance(b, int):
        return [(path.rstrip("."), a, b)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [x for i, (u, v) in enumerate(zip(a, b)) for x in _int_pairs(u, v, f"{path}{i}.")]
    if isinstance(a, dict) and isinstance(b, dict) and "node" not in a:
        return [x for k in a if k in b for x in _int_pairs(a[k], b[k], f"{path}{k}.")]
    return []


def _explain_export_failure(e: Exception) -> str:
    text = str(e)
    where = ""
    tb = traceback.extract_tb(e.__traceback__)
    for fr in reversed(tb):
        if f"{os.sep}torch{os.sep}" not in fr.filename and "hap" + os.sep + "capture.py" not in fr.filename:
            where = f"{_short_path(fr.filename)}:{fr.lineno}  {(fr.line or '').strip()}"
            break
    m = re.search(r'File "([^"]+)", line (\d+).*\n\s*(.+)', text)
    if m and f"{os.sep}torch{os.sep}" not in m.group(1):
        where = f"{_short_path(m.group(1))}:{m.group(2)}  {m.group(3).strip()}"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    hint = ("the model's forward must be traceable by torch.export: avoid Python control flow on tensor "
            "values (if x.sum() > 0: ...; use torch.where or torch.cond), .item()/.tolist() on tensors, "
            "and data-dependent shapes; forward(*batch) must return the scalar loss")
    if "data-dependent" in text.lower() or "guard" in text.lower() or "GuardOnDataDependent" in type(e).__name__:
        hint = ("data-dependent control flow: a Python `if`/loop or shape depends on tensor values. "
                "Rewrite it with torch.where / torch.cond, or compute the condition outside the model")
    return (f"cannot capture the model: {type(e).__name__}: {first[:300]}\n"
            f"  at {where or 'unknown location'}\n  fix: {hint}")


def _rename(obj: Any, renamed: dict[str, str]) -> Any:
    if isinstance(obj, dict) and "node" in obj and len(obj) == 1:
        return {"node": renamed.get(obj["node"], obj["node"])}
    if isinstance(obj, list):
        return [_rename(x, renamed) for x in obj]
    return obj


MAX_CONSTANT_NUMEL = 4096  # a larger tensor made inside forward belongs in a registered buffer


def _constant_node(name: str, fqn: str, value: torch.Tensor) -> Node:
    """A tensor that forward makes from literals (``torch.tensor([])`` in a library's cache code,
    ``torch.tensor(0)`` in T5's label shifting), which torch.export lifts into the program:
    it becomes a creation op that every rank runs, so the value lives in the plan and the
    emitted program, and nobody edits the library."""
    meta = _meta_of(value)
    if value.is_meta:
        raise CaptureError(f"forward creates the tensor constant {fqn} on the meta device, so its value is unknown")
    if value.numel() > MAX_CONSTANT_NUMEL:
        raise CaptureError(f"forward creates the tensor constant {fqn} of shape {tuple(value.shape)} from literals; "
                           "register it with self.register_buffer(...) in __init__ so it is model state")
    device = {"device": str(value.device)}
    if value.numel() == 0:  # no values: only the shape matters (torch.tensor([]) cannot make every empty shape)
        args, target = [list(value.shape)], "aten.zeros.default"
    else:
        args, target = [_encode(value.tolist(), fqn)], "torch.tensor"
    return Node(name, "op", target, args, {"dtype": _encode(value.dtype, fqn), "device": device}, meta, "creation",
                0.0, float(value.numel() * value.element_size()), f"{fqn} (a constant made inside forward)")


def _graph_from_export(ep: torch.export.ExportedProgram, model: torch.nn.Module, name: str) -> Graph:
    sig = ep.graph_signature
    inputs_to_params = dict(sig.inputs_to_parameters)
    inputs_to_buffers = dict(sig.inputs_to_buffers)
    inputs_to_constants = dict(getattr(sig, "inputs_to_lifted_tensor_constants", None) or {})
    # state_dict keys that alias one tensor (tied weights) share one placeholder
    aliases: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(v), []).append(k)
    by_key = {}
    for ks in aliases.values():
        for k in ks:
            by_key[k] = ks
    user_outputs = [s for s in sig.output_specs if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    if len(user_outputs) != 1:
        raise CaptureError(f"forward(*batch) returned {len(user_outputs)} values; it must return only the "
                           "scalar training loss")
    loss_name = user_outputs[0].arg.name
    if loss_name in inputs_to_params or loss_name in inputs_to_buffers:
        raise CaptureError("forward(*batch) returned a parameter or buffer; it must compute the training loss")
    token_wise = {path: m for path, m in model.named_modules() if path and is_token_wise(m)}
    token_wise_paths = set(token_wise)
    nodes: list[Node] = []
    num_inputs = 0
    first_of_group: dict[str, str] = {}  # first state_dict key of an alias group -> placeholder name
    renamed: dict[str, str] = {}  # duplicate placeholder of a tied tensor -> the one kept
    for n in ep.graph.nodes:
        meta = _meta_of(n.meta.get("val"))
        if n.op == "placeholder":
            if n.name in inputs_to_params:
                key = inputs_to_params[n.name]
                group = by_key.get(key, [key])
                if group[0] in first_of_group:  # tied weight: one tensor, one placeholder, one gradient
                    renamed[n.name] = first_of_group[group[0]]
                    continue
                first_of_group[group[0]] = n.name
                nodes.append(Node(n.name, "param", key, meta=meta, aliases=by_key.get(key, [key])))
            elif n.name in inputs_to_constants:
                fqn = inputs_to_constants[n.name]
                nodes.append(_constant_node(n.name, fqn, ep.constants[fqn]))
            elif n.name in inputs_to_buffers:
                key = inputs_to_buffers[n.name]
                nodes.append(Node(n.name, "buffer", key, meta=meta, aliases=by_key.get(key, [key])))
            else:
                if not isinstance(meta, TensorMeta):
                    raise CaptureError(f"batch input {n.name} is not a tensor")
                nodes.append(Node(n.name, "input", str(num_inputs), meta=meta, source=f"batch[{num_inputs}]"))
                num_inputs += 1
        elif n.op == "get_attr":  # a higher-order op's subgraph: the op itself is refused below
            continue
        elif n.op == "call_function":
            target = "getitem" if n.target is operator.getitem else str(n.target)
            where = _user_frame(n.meta.get("stack_trace"))
            if not (n.target is operator.getitem or isinstance(n.target, torch._ops.OpOverload)):
                raise CaptureError(_unrenderable(n.target, where or n.name))
            args = _rename(_encode(list(n.args), f"{where or n.name}"), renamed)
            kwargs = {k: _rename(_encode(v, where or n.name), renamed) for k, v in n.kwargs.items()}
            ins = [_meta_of(a.meta.get("val")) if isinstance(a, torch.fx.Node) else None for a in n.args]
            flat_ins = [m for m in ins if isinstance(m, TensorMeta)]
            in_bytes = sum(m.nbytes for m in flat_ins)
            out_list = meta if isinstance(meta, list) else [meta] if meta is not None else []
            out_bytes = sum(m.nbytes for m in out_list)
            cls = op_class(target)
            flops = count_flops(target, ins, meta, n.args) if out_list else 0.0
            if target == "aten._assert_tensor_metadata.default":
                in_bytes = 0  # it reads the tensor's metadata, not its data
            nodes.append(Node(n.name, "op", target, args, kwargs, meta, cls, flops, float(in_bytes + out_bytes),
                              where, _module_of(n), token_wise=_token_wise_of(n, token_wise_paths)))
        elif n.op == "output":
            pass
        else:
            raise CaptureError(f"unexpected {n.op} node {n.name} in the exported graph")
    g = Graph(nodes, loss_name, num_inputs, name)
    for path, m in token_wise.items():
        form = expert_parallel_form(m)
        if isinstance(form, dict):
            g.experts[path] = form
        else:
            log.info("the experts of %s stay whole on every rank: %s", path, form)
    loss = g[loss_name].meta
    if not isinstance(loss, TensorMeta) or loss.shape != ():
        shape = loss.shape if isinstance(loss, TensorMeta) else loss
        raise CaptureError(f"forward(*batch) must return the scalar training loss, it returned shape {shape}; "
                           "reduce it, e.g. F.cross_entropy(logits, y) (reduction='mean')")
    if not loss.is_float:
        raise CaptureError(f"forward(*batch) returned a {loss.dtype} scalar ({g[loss_name].source or loss_name}), "
                           "which has no gradient; return the float training loss, e.g. F.cross_entropy(logits, y) "
                           "rather than a count or an argmax")
    if loss_name not in g.requires_grad():
        raise CaptureError(f"forward(*batch) returned a loss that no parameter's gradient flows into "
                           f"({g[loss_name].source or loss_name}): it is computed without the parameters, after "
                           ".detach(), or under torch.no_grad(); return the loss that training differentiates")
    g.lint()
    return g
