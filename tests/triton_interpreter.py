"""Running Triton kernels on the CPU in Triton's interpreter, for the kernel tests (`test_kernels_interpreter.py`,
`test_w8a8_triton.py`, `test_fused_fake_quant_interpreter.py`): ``TRITON_INTERPRET=1`` must be set before the
kernels are defined, hence a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# triton 3.6's interpreter calls int() on 1-element arrays, which numpy 2 refuses: give its tensors an __index__
PATCH = textwrap.dedent(r'''
    import numpy, triton.runtime.interpreter as interp

    if int(numpy.__version__.split(".")[0]) >= 2:
        _patch = interp._patch_lang_tensor

        def _patched(tensor, scope):
            _patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interp._patch_lang_tensor = _patched
''')


def run_in_interpreter(script: str) -> subprocess.CompletedProcess:
    """Run ``PATCH + script`` with the interpreter on, the repository and tests/ importable, one thread."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), str(root / "tests"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", PATCH + script], env=env, capture_output=True, text=True, timeout=900)
