"""hap-profile: quick mode produces a loadable device profile with provenance."""
from __future__ import annotations

import json

import pytest

from hap.cluster import DeviceProfile
from hap.profile import main, run
from hap.profile.fit import _fit_line, fit_collectives
from hap.profile.harness import FORMAT
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def quick_profile():
    return run(quick=True, nproc=1, show=False)


def test_quick_profile_structure(quick_profile):
    p = quick_profile
    dev = DeviceProfile.from_json(p, "quick profile")  # the profiles/devices format
    assert dev.flop_per_s["matmul"]["fp32"] > 0 and dev.memory_bytes_per_s > 0 and dev.kernel_floor_s > 0
    for cls in ("matmul", "conv", "attention"):
        assert "fp32" in p["flop_per_s"][cls]
    assert set(p["memory_bytes_per_s_by_class"]) == {"pointwise", "reduction", "copy"}
    assert p["detail"]["format"] == FORMAT


def test_quick_profile_provenance(quick_profile, tmp_path):
    p = quick_profile
    detail = p["detail"]
    env = detail["environment"]
    for key in ("date", "host", "torch", "cpu_model", "processes", "device"):
        assert env[key] not in (None, "")
    # every number of the profile says where it came from (as tests/test_cluster.py demands)
    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield f"{prefix}{k}"
    body = {k: v for k, v in p.items() if k not in ("provenance", "detail")}
    for leaf in leaves(body):
        assert p["provenance"][leaf].startswith(("measured:", "budget:", "assumed:")), leaf
    assert "torch=" in p["provenance"]["environment"] and "host=" in p["provenance"]["environment"]
    assert "samples (median" in p["provenance"]["flop_per_s.matmul.fp32"]
    # repeated samples, their median and spread
    m = detail["measurements"]["matmul.fp32"][0]
    assert len(m["samples_s"]) == detail["settings"]["repeats"] >= 3
    assert min(m["samples_s"]) <= m["median_s"] <= max(m["samples_s"]) and m["spread"] >= 0
    assert detail["measurements"]["pointwise"]["unit"] == "bytes/s"
    # written as a profile the cluster loader accepts, with the samples beside it
    from hap.cluster import load_device
    from hap.profile.document import write

    out, side = write(p, tmp_path / "devices" / "cpu.json")
    assert load_device(out).name == "cpu" and "detail" not in json.loads(out.read_text())
    assert json.loads(side.read_text())["format"] == FORMAT and side.parent.name == "samples"


def test_cli_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr("hap.profile.launch.run", lambda **kw: {"name": "cpu", "flop_per_s": {"matmul": {"fp32": 1.0}},
                                                        "memory_bytes": 1, "memory_bytes_per_s": 1.0,
                                                        "kernel_floor_s": 0.0, "intra_node": {
                                                            "kind": "x", "bytes_per_s": 1.0, "alpha_s": 0.0}})
    out = tmp_path / "p.json"
    assert main(["--quick", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["name"] == "cpu"
    assert main(["--repeats", "0"]) == 2


def test_fits_recover_alpha_beta():
    xs = [2.0**k for k in range(10, 24, 2)]
    a, b = _fit_line(xs, [1e-4 + x / 1e9 for x in xs])
    assert a == pytest.approx(1e-4, rel=1e-6) and 1 / b == pytest.approx(1e9, rel=1e-6)
    from hap.cluster import Link
    from hap.machine import collective_s
    from hap.profile.harness import Measurement

    link = Link(5e-5, 2e9)
    ms = []
    for nb in xs:
        for kind, form, ls in (("all_reduce", "", ()), ("all_gather", "padded", (3, 1)),
                               ("all_gather", "grouped", (3, 1)), ("reduce_scatter", "padded", (2, 2))):
            fr = tuple(v / sum(ls) for v in ls) if ls else (0.5, 0.5)
            t = collective_s(kind, nb, fr, link, form)
            ms.append(Measurement(kind, "s", [t], 1.0, {"collective": kind, "form": form, "bytes": nb,
                                                         "lengths": list(ls), "ranks": 2}))
    per, alpha, bw, per_formula = fit_collectives(ms)
    assert alpha == pytest.approx(5e-5, rel=1e-6) and bw == pytest.approx(2e9, rel=1e-6)
    # fitted per collective and form in the cost model's own formulas: each recovers the link
    assert set(per_formula) == {"all_reduce", "all_gather.padded", "all_gather.grouped", "reduce_scatter.padded"}
    for a, b in per_formula.values():
        assert a == pytest.approx(5e-5, rel=1e-3) and b == pytest.approx(2e9, rel=1e-3)
    assert set(per) == {"all_reduce", "all_gather.padded.uneven", "all_gather.grouped.uneven",
                        "reduce_scatter.padded.even"}


def test_collective_fit_ignores_erratic_mid_sizes():
    """α from the smallest transfers, bandwidth from the largest: a mid-size point 3x off (as 1 MiB
    gloo all-reduces are on a busy VM) does not move the fit."""
    from hap.profile.fit import _fit_formula

    alpha, bw = 4e-4, 5e8
    sizes = [2**12, 2**16, 2**20, 2**23]
    rows = [(2.0, nb / 1.0, 2 * alpha + nb / bw) for nb in sizes]  # all-reduce on 2 ranks: ca=2, cb=T
    rows[2] = (rows[2][0], rows[2][1], 3 * rows[2][2])
    a, b = _fit_formula(rows)
    assert a == pytest.approx(alpha, rel=1e-9) and b == pytest.approx(bw, rel=1e-9)


@pytest.mark.parametrize("name,gib,profile", [
    ("Tesla V100-SXM2-16GB", 15.77, "V100-16GB"), ("NVIDIA A100-SXM4-80GB", 79.2, "A100-80GB"),
    ("NVIDIA L4", 22.5, "L4-24GB"), ("Tesla T4", 14.75, "T4-16GB"), ("NVIDIA H100 80GB HBM3", 79.6, "H100-80GB"),
    ("NVIDIA A10", 22.3, "A10-24GB"), ("Tesla P100-PCIE-16GB", 15.9, "P100-16GB"),
])
def test_a_measured_gpu_profile_is_named_as_the_shipped_one_of_its_kind(name, gib, profile):
    from hap.profile.document import gpu_profile_name

    assert gpu_profile_name(name, int(gib * 2**30)) == profile
    assert (ROOT / "profiles" / "devices" / f"{profile}.json").exists()
