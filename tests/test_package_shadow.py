"""The checkout's ``kernels/`` folder imported under its bare name (the project root on sys.path, as
``python -m`` from a checkout puts it) must not pass for the PyPI package of that name: with the
real one installed it loads that; without it, it looks like a stray namespace folder, which
transformers' package probe treats as absent (it imports the name when no metadata is found)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import os, sys
root = sys.argv[1]
sys.path = [root] + [p for p in sys.path if "site-packages" not in p and os.path.abspath(p or ".") != root]
import kernels
print(repr(kernels.__file__), getattr(kernels, "__version__", "N/A"), len([k for k in vars(kernels) if not k.startswith("__")]))
try:
    from kernels import get_kernel  # noqa: F401
    print("imported")
except ImportError:
    print("ImportError")
"""


def test_bare_kernels_without_the_package_is_an_empty_shadow():
    out = subprocess.run([sys.executable, "-c", PROBE, ROOT], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "N/A", "0", "ImportError"]


def test_kiln_kernels_unaffected():
    out = subprocess.run([sys.executable, "-c", "import kiln.kernels.quant as q; print(q.__name__)"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "kiln.kernels.quant", out.stderr
