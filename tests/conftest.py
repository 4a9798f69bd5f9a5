import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# the gpu / slow markers: GPU tests skip without a CUDA device
from rwkvops.testing import pytest_collection_modifyitems, pytest_configure  # noqa: E402,F401
