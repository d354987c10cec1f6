"""The test suite's own rules: without dlib every face test skips with one reason (none errors)."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import NO_DLIB

ROOT = Path(__file__).resolve().parents[1]


def test_without_dlib_face_tests_skip_with_one_reason(tmp_path):
    (tmp_path / "dlib.py").write_text('raise ModuleNotFoundError("No module named dlib (hidden)", name="dlib")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_identity.py", "tests/test_face_nodes.py", "-k",
                           "not rig_sweep and (identity or detect_and_align or no_face or similarity)"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    reasons = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("SKIPPED")]
    assert reasons and set(reasons) == {NO_DLIB}, out[-3000:]
    assert " error" not in out and "passed" not in out.splitlines()[-1]
