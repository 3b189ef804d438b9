"""Fitting α-β to the collective measurements, in the cost model's own formulas
(``hap.machine.collective_s``)."""
from __future__ import annotations

from typing import Any

from .harness import Measurement, _sig


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """t = a + b x minimising relative error; a >= 0."""
    w = [1.0 / (y * y) for y in ys]
    sw, sx, sy = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * y for wi, y in zip(w, ys))
    sxx, sxy = sum(wi * x * x for wi, x in zip(w, xs)), sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    det = sw * sxx - sx * sx
    if det <= 0:
        return min(ys), 0.0
    a, b = (sxx * sy - sx * sxy) / det, (sw * sxy - sx * sy) / det
    if a < 0:  # through the origin
        a, b = 0.0, sxy / sxx
    return a, max(b, 0.0)


def fit_collectives(ms: list[Measurement]) -> tuple[dict[str, Any], float, float, dict[str, tuple[float, float]]]:
    """Per collective (kind, form, even/uneven): α + bytes·β; the link (α, bytes/s) in
    ``hap.machine.collective_s``'s terms, fitted to all points jointly (relative least squares); and
    that pair fitted per collective and form (what the cost model uses where the profile has it)."""
    from hap.machine import Link, collective_s

    groups: dict[str, list[Measurement]] = {}
    for m in ms:
        shape = "even" if len(set(m.extra["lengths"])) <= 1 else "uneven"
        key = m.extra["collective"] + (f".{m.extra['form']}.{shape}" if m.extra["lengths"] else "")
        groups.setdefault(key, []).append(m)
    per = {}
    per_formula: dict[str, tuple[float, float]] = {}
    rows = []
    for key, g in groups.items():
        xs, ys = [m.extra["bytes"] for m in g], [m.used_s for m in g]
        a, slope = _fit_line(xs, ys)
        per[key] = {"alpha_s": _sig(a), "bytes_per_s": _sig(1 / slope) if slope > 0 else None,
                    "points": [[x, float(f"{y:.6g}")] for x, y in zip(xs, ys)]}
        for m in g:
            n, ls = m.extra["ranks"], m.extra["lengths"]
            fr = tuple(x / sum(ls) for x in ls) if ls else (1 / n,) * n
            fd = m.extra.get("dst_lengths")
            fd = tuple(x / sum(fd) for x in fd) if fd else None
            form = m.extra["form"]
            ca = collective_s(m.extra["collective"], m.extra["bytes"], fr, Link(1.0, 1e300), form, fd)
            cb = collective_s(m.extra["collective"], m.extra["bytes"], fr, Link(0.0, 1.0), form, fd)
            rows.append((ca, cb, m.used_s, m.extra["collective"] + (f".{form}" if form else "")))
    alpha, bw = _fit_formula([(ca, cb, t) for ca, cb, t, _ in rows])
    for key in sorted({k for *_, k in rows}):  # the formula's (α, bytes/s) per collective and form
        a, b = _fit_formula([(ca, cb, t) for ca, cb, t, k in rows if k == key])
        per_formula[key] = (_sig(a), _sig(b))
    return per, alpha, bw, per_formula


def _fit_formula(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(α, bytes/s) with t = ca·α + cb/bw through the smallest and the largest transfers: the
    quarter of the rows with the smallest bandwidth term ``cb`` fixes α, the quarter with the
    largest fixes the bandwidth. Mid-size CPU collectives are erratic (a 1 MiB gloo all-reduce's
    quartiles were 1.3 and 4.9 ms in one run), and a relative least-squares fit through them put
    one calibration's 8.8 MB gradient all-reduce at 31 ms where the training step took ~18."""
    rows = sorted(rows, key=lambda r: r[1])
    k = max(1, len(rows) // 4)
    lo = [sum(col) for col in zip(*rows[:k])]
    hi = [sum(col) for col in zip(*rows[-k:])]
    det = lo[0] * hi[1] - lo[1] * hi[0]
    alpha, inv_bw = ((lo[2] * hi[1] - lo[1] * hi[2]) / det, (lo[0] * hi[2] - lo[2] * hi[0]) / det) \
        if abs(det) > 1e-300 else (0.0, 0.0)
    if alpha < 0:  # through the origin, from the large transfers
        alpha, inv_bw = 0.0, hi[2] / hi[1]
    if inv_bw <= 0:  # latency-bound throughout
        alpha, inv_bw = hi[2] / hi[0], 1e-12
    return alpha, 1 / inv_bw
