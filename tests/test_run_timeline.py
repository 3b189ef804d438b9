"""A run's --log-json drawn as measured compute per rank and step, re-balancing marked."""
from __future__ import annotations

import json

from hap.timeline import main as draw_main


def test_a_run_log_draws_and_a_log_without_compute_is_refused(tmp_path, capsys):
    log = {"step_s": [0.3, 0.3, 0.5, 0.3], "first_step": 0,
           "compute_s": [[0.2, 0.25], [0.2, 0.25], [0.45, 0.2], [0.25, 0.26]],
           "rebalance": [{"step": 3, "shares": [40, 60], "reason": "rank 0 slowed"}]}
    (tmp_path / "log.json").write_text(json.dumps(log))
    assert draw_main([str(tmp_path / "log.json"), "--out", str(tmp_path / "run.png")]) == 0
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "static.json").write_text(json.dumps({"step_s": [0.3], "compute_s": []}))
    assert draw_main([str(tmp_path / "static.json"), "--out", str(tmp_path / "x.png")]) == 2
    assert "re-balances" in capsys.readouterr().err
