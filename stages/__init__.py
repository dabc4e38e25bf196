"""Thin DVC stage scripts: read params and inputs, call :mod:`mechdiff`, write outputs atomically."""

import os

# OpenMP worker threads that spin while idle stall badly when another process shares the cores
# (measured here: 20 training steps took 147 s with the default policy, 8 s with PASSIVE). Set before
# torch is imported by any stage; an explicit user setting wins (OMP_POLICY_FROM_USER records it).
OMP_POLICY_FROM_USER = "OMP_WAIT_POLICY" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
