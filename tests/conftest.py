import os
import sys
from pathlib import Path

import pytest

# The repo root on the path, so tests run the same from a fresh clone with or without an install.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cuda_runtime_available() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_runtime_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and a CUDA-enabled TVM runtime")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("builds")
