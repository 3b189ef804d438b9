"""User-facing error types. Each message says what was wrong, where, and how to fix it.

`assert` is only for internal invariants; anything a user can cause raises a HapError.
The CLI turns a HapError into a short message and exit status 2.
"""


class HapError(Exception):
    """Base class of every error a user can cause."""


class SpecError(HapError):
    """The model spec file is missing, unreadable or breaks the spec protocol."""


class CaptureError(HapError):
    """The model could not be captured into an ATen graph."""


class ClusterFileError(HapError):
    """A cluster TOML file or device profile is missing or malformed."""


class PinError(HapError):
    """A pin (``--pin NODE=PLACEMENT``, or ``pins=`` of ``plan_graph``) is not written NODE=PLACEMENT
    with a placement R, P, S(d) or S(d/u)."""


class InfeasiblePlan(HapError):
    """No plan fits the cluster (memory, batch too small for the ranks, ...)."""


class UnsupportedOp(HapError):
    """An op has no sharding rule and strict mode forbids running it replicated."""


class PlanFileError(HapError):
    """A plan (plan.json, or a Plan built by hand) is malformed or inconsistent."""
