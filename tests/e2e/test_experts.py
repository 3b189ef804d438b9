"""Expert parallelism (hap.runtime.experts): on 3 ranks holding uneven ranges of transformers'
experts, each rank's output and every gradient equal what the module computes on one device."""
from __future__ import annotations

import pytest

from tests.e2e.harness import rank_outputs

EXPERTS_PARALLEL = r'''
import json, sys
import torch
import transformers as tf
import hap.runtime as hr
from hap.runtime.experts import experts_parallel

hr.init("gloo")
rank, world = hr.rank(), hr.world_size()
torch.manual_seed(0)
cfg = tf.Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=24, num_experts=5, num_experts_per_tok=2)
module = tf.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts(cfg)
torch.nn.init.normal_(module.gate_up_proj, std=0.3)
torch.nn.init.normal_(module.down_proj, std=0.3)
shares, lengths = [7, 4, 2], [2, 2, 1]  # tokens and experts per rank, uneven
x = torch.randn(sum(shares), 16)
w, idx = torch.softmax(torch.randn(sum(shares), 5), -1).topk(2, dim=-1)
want = module(x.clone().requires_grad_(), idx, w)  # the whole batch on one device

lo, n = sum(shares[:rank]), shares[rank]
e0, e = sum(lengths[:rank]), lengths[rank]
mine = x[lo:lo + n].clone().requires_grad_()
weights = w[lo:lo + n].clone().requires_grad_()
gu = module.gate_up_proj.detach()[e0:e0 + e].clone().requires_grad_()
dn = module.down_proj.detach()[e0:e0 + e].clone().requires_grad_()
got = experts_parallel(mine, idx[lo:lo + n], weights, gu, dn, lengths, "silu",
                       torch.ops.transformers.grouped_mm_fallback.default)
probe = torch.randn(sum(shares), 16, generator=torch.Generator().manual_seed(1))
(got * probe[lo:lo + n]).sum().backward()
xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
ref = tf.integrations.moe.grouped_mm_experts_forward(module, xs, idx, ws)
(ref * probe).sum().backward()
err = lambda a, b: float((a - b).abs().max() / (b.abs().max() + 1e-12))
json.dump({"out": err(got.detach(), ref.detach()[lo:lo + n]), "x": err(mine.grad, xs.grad[lo:lo + n]),
           "w": err(weights.grad, ws.grad[lo:lo + n]), "gate_up": err(gu.grad, module.gate_up_proj.grad[e0:e0 + e]),
           "down": err(dn.grad, module.down_proj.grad[e0:e0 + e]),
           "eager": err(ref.detach(), want.detach())}, open(f"{sys.argv[1]}.{rank}", "w"))
hr.shutdown()
'''


def test_experts_on_uneven_ranges_equal_the_single_device_module(tmp_path):
    pytest.importorskip("transformers")
    for got in rank_outputs(EXPERTS_PARALLEL, tmp_path, nproc=3):
        assert got["eager"] < 1e-5, "the grouped-matmul path computes what the module's own forward does"
        assert max(got[k] for k in ("out", "x", "w", "gate_up", "down")) < 1e-5, got
