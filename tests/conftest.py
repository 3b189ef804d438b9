"""Test-wide settings.

Plans for ``device = "cpu"`` use the shipped ``profiles/devices/cpu.json`` here, not the
on-first-use calibration of this machine (``hap.calibrate``): a test's plan must not depend on
how fast the machine running it happened to be. tests/test_calibrate.py exercises the
calibration itself, with its own cache folder.
"""
import os

os.environ.setdefault("HAP_CPU_PROFILE", "shipped")
