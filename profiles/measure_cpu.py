"""Measure this machine as the `cpu` device profile: now `hap-profile` (hap/profile/).

    python profiles/measure_cpu.py [--repeats 7]    # == hap-profile --out profiles/devices/cpu.json

Kept so the old command still works; the one implementation is hap.profile.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from hap.profile import main

    args = sys.argv[1:]
    if "--out" not in args:
        args = ["--out", str(Path(__file__).resolve().parent / "devices" / "cpu.json"), *args]
    sys.exit(main(args))
