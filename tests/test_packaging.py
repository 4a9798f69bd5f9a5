"""The wheel: build it, install it into a fresh virtualenv, import, find the CUDA sources, run the CPU path."""
import os
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r"""
import os, sys, numpy as np, rwkvops
from rwkvops import _compile
assert ROOT_MARK not in rwkvops.__file__, rwkvops.__file__
src = _compile.CUDA_SRC
assert 'site-packages' in str(src), src
names = sorted(p.name for p in src.iterdir())
for op in ('wkv4', 'wkv6', 'wkv7'):
    assert f'{op}.cu' in names, names
assert 'common.cuh' in names
for name in rwkvops.list_ops():
    for k in rwkvops.get_op(name).kernels:
        assert len(_compile.read_source(k.source)) > 100
rng = np.random.default_rng(0)
x = [rng.standard_normal((1, 5, 2, 4)).astype(np.float32) for _ in range(6)]
y, s = rwkvops.wkv7(*x)
assert y.shape == (1, 5, 2, 4) and s.shape == (1, 2, 4, 4) and np.isfinite(y).all()
print('ok', sorted(rwkvops.list_ops()))
"""


@pytest.mark.slow
def test_wheel_installs_and_runs(tmp_path):
    dist = tmp_path / "dist"
    b = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(dist), ROOT],
                       capture_output=True, text=True)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    wheels = list(dist.glob("rwkvops-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "-c", os.path.join(ROOT, "constraints.txt"),
                          str(wheels[0])], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    run = subprocess.run([py, "-c", CHECK.replace("ROOT_MARK", repr(ROOT))], capture_output=True, text=True,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok" in run.stdout
