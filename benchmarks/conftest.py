import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402
from rwkvops.testing import has_gpu  # noqa: E402


def pytest_sessionstart(session):
    if has_gpu():
        harness.ENV.update(harness.environment())
        harness.ENV["copy_gbs"] = harness.copy_bandwidth_gbs()
        print(f"\nGPU {harness.ENV['gpu']}: measured copy bandwidth {harness.ENV['copy_gbs']:.0f} GB/s")


def pytest_sessionfinish(session, exitstatus):
    path = harness.write_results()
    if path:
        print(f"\nwrote {path}")


@pytest.fixture(autouse=True)
def _needs_gpu():
    if not has_gpu():
        pytest.skip("benchmarks need a CUDA GPU")
