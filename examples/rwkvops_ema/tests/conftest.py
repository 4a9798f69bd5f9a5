# the gpu marker: GPU tests skip without a CUDA device (the hooks every rwkvops plugin's tests can share)
from rwkvops.testing import pytest_collection_modifyitems, pytest_configure  # noqa: F401
