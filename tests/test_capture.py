"""Capture: ATen graph with shapes, FLOPs, source lines; tied weights share one node."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hap.capture import capture
from hap.errors import CaptureError
from tests.helpers import captured, load_example


def test_nodes_carry_shapes_flops_and_source():
    _, _, g = captured(load_example("mlp"), batch_size=8)
    lin = [n for n in g.ops() if n.target == "aten.linear.default"]
    assert lin[0].out.shape == (8, 256)
    assert lin[0].flops == 2 * 8 * 64 * 256
    assert lin[0].op_class == "matmul"
    assert lin[0].source.startswith("examples/mlp.py:") or "mlp.py:" in lin[0].source
    assert "hidden.0" in lin[0].module
    g.lint()


def test_tied_weights_are_one_parameter_with_both_names():
    _, _, g = captured(load_example("gpt"))
    tied = [p for p in g.params() if len(p.aliases) > 1]
    assert len(tied) == 1 and set(tied[0].aliases) == {"tok.weight", "head.weight"}
    users = [n for n in g.ops() if tied[0].name in n.inputs()]
    assert {n.target for n in users} == {"aten.embedding.default", "aten.linear.default"}


def test_data_dependent_control_flow_names_the_line():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            y = self.lin(x)
            if y.sum() > 0:  # data-dependent
                return y.mean()
            return -y.mean()

    with pytest.raises(CaptureError) as e:
        capture(M(), (torch.randn(4, 3),))
    assert "test_capture.py" in str(e.value) and "torch.where" in str(e.value)


def test_non_scalar_output_is_a_clear_error():
    with pytest.raises(CaptureError, match="scalar"):
        capture(nn.Linear(3, 2), (torch.randn(4, 3),))
