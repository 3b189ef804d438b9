"""What a run reports: rank 0's progress line per step, TensorBoard scalars (``--tensorboard``)
and the run's record (``--log-json``)."""
from __future__ import annotations

import json
from typing import Any

from .checks import Refused


def progress_line(step: int, steps: int, loss: float, lr: float, norm: float | None, step_s: list[float],
                  wait_s: float, samples: int, tokens: int) -> str:
    """Rank 0's line per step: loss, learning rate, gradient norm, throughput, the data wait's
    share of the step and the time left at the recent pace."""
    recent = step_s[-20:]
    pace = sum(recent) / len(recent)
    left = (steps - step - 1) * pace
    eta = f"{left / 60:.0f}m{left % 60:02.0f}s" if left >= 60 else f"{left:.0f}s"
    rate = f"{tokens / pace:,.0f} tok/s" if tokens != samples else f"{samples / pace:,.0f} samples/s"
    gnorm = f"  grad-norm {norm:.3g}" if norm is not None else ""
    return (f"step {step:4d}  loss {loss:.6f}  lr {lr:.3g}{gnorm}  {step_s[-1] * 1e3:7.1f} ms  {rate}  "
            f"data wait {wait_s / step_s[-1]:3.0%}  eta {eta}")


def tensorboard_writer(logdir: str | None, rank: int):
    """Rank 0's TensorBoard writer for ``--tensorboard DIR`` (None without it, and on other ranks)."""
    if not logdir or rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise Refused(f"--tensorboard {logdir}: the tensorboard package is not installed; pip install "
                      "'hap[tensorboard]' (or run without --tensorboard: --log-json records the same values)") from None
    return SummaryWriter(logdir)


PHASES = ("compute", "exposed_comm", "grad_sync", "optimizer", "data_wait", "other")
PHASE_STEPS = 2000  # the per-step phase record keeps a run's last this many steps (every rank's, on rank 0)


class Phases:
    """Where each step's wall time goes on this rank, phase by phase (``PHASES``):

    - ``compute``: forward and backward, less the time spent inside their collectives (with
      ``--emulate``, the emulated device's slower compute);
    - ``exposed_comm``: inside forward's and backward's collectives, waiting for other ranks included;
    - ``grad_sync``: finishing the gradient all-reduce after backward, waiting for the slowest rank included;
    - ``optimizer``: gradient norm, clipping and the optimizer step;
    - ``data_wait``: getting this step's batch;
    - ``other``: the rest of the step (zeroing gradients, the loop's own work).

    Each step's phases sum to its ``step_s``; ``gathered`` collects every rank's record.
    ``overlap_s`` holds, per step, how long before backward ended this rank launched its first
    gradient bucket (0 when every bucket waited for backward's end)."""

    def __init__(self) -> None:
        self.rows: list[list[float]] = []
        self.overlap_s: list[float] = []
        self._now: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self._now[phase] = self._now.get(phase, 0.0) + seconds

    def end_step(self, step_s: float) -> None:
        row = [self._now.get(p, 0.0) for p in PHASES[:-1]]
        self.rows.append([*row, max(step_s - sum(row), 0.0)])
        self._now = {}

    def gathered(self, rank: int, world: int, all_reduce) -> dict[str, list[list[float]]]:
        """``{phase: [[seconds of rank 0, rank 1, ...] per step]}`` over the last ``PHASE_STEPS``
        steps, every rank's (one sum all-reduce of a zero table with this rank's column filled)."""
        import torch

        rows = self.rows[-PHASE_STEPS:]
        table = torch.zeros(len(rows), len(PHASES), world, dtype=torch.float64)
        if rows:
            table[:, :, rank] = torch.tensor(rows, dtype=torch.float64)
        all_reduce(table)
        return {p: [[round(x, 7) for x in table[s, i].tolist()] for s in range(len(rows))]
                for i, p in enumerate(PHASES)}


class RunLog:
    """Each step's loss, learning rate, gradient norm and time, printed by rank 0 and written to
    TensorBoard as they come, and to ``--log-json`` at the end. ``samples`` and ``tokens`` per
    step give the throughput (tokens: the samples' length when they are token sequences)."""

    def __init__(self, rank: int, steps: int, board, samples: int, tokens: int) -> None:
        self.rank, self.steps, self.board = rank, steps, board
        self.samples, self.tokens = samples, tokens
        self.losses: list[float] = []
        self.step_s: list[float] = []
        self.lrs: list[float] = []
        self.norms: list[float] = []
        self.val: list[dict[str, float]] = []

    def step(self, step: int, loss: float, lr: float, norm: float, step_s: float, wait_s: float) -> None:
        self.losses.append(loss)
        self.lrs.append(lr)
        self.norms.append(norm)
        self.step_s.append(step_s)
        if self.rank == 0:
            print(progress_line(step, self.steps, loss, lr, norm, self.step_s, wait_s, self.samples, self.tokens),
                  flush=True)
        if self.board is not None:
            rate = "train/tokens_per_s" if self.tokens != self.samples else "train/samples_per_s"
            for tag, value in (("train/loss", loss), ("train/lr", lr), ("train/grad_norm", norm),
                               ("train/step_s", step_s), (rate, self.tokens / step_s)):
                self.board.add_scalar(tag, value, step)

    def validated(self, step: int, done: int, loss: float) -> None:
        self.val.append({"step": done, "loss": loss})
        if self.rank == 0:
            print(f"step {step:4d}  val loss {loss:.6f}", flush=True)
        if self.board is not None:
            self.board.add_scalar("val/loss", loss, done)

    def close(self, path: str | None, **record: Any) -> None:
        """Close TensorBoard; rank 0 writes the record to ``path`` (``--log-json``) with ``record``."""
        if self.board is not None:
            self.board.close()
        if path and self.rank == 0:
            with open(path, "w") as f:
                json.dump({"losses": self.losses, "step_s": self.step_s, "val_losses": self.val, "lr": self.lrs,
                           "grad_norm": self.norms, **record}, f)
