import sys
from pathlib import Path

import pytest

# The repo root on the path, so tests run the same from a fresh clone with or without an install.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _nvml_gpu() -> bool:
    from etune.measurements.nvml_energy import nvml_available

    return nvml_available()


def pytest_collection_modifyitems(config, items):
    """``nvml`` tests need a GPU that NVML sees (vendor kernels run through PyTorch); ``gpu`` tests
    also need TVM to run CUDA kernels. Without a GPU both skip; on a GPU host whose TVM cannot run
    CUDA (libcudart missing, say) the ``gpu`` tests fail with that reason: a GPU session must not
    pass by skipping everything."""
    wanted = [item for item in items if "gpu" in item.keywords or "nvml" in item.keywords]
    if not wanted:
        return
    if not _nvml_gpu():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (NVML finds none)")
        for item in wanted:
            item.add_marker(skip)
        return
    from etune.measurements.tvm_runner import cuda_runtime_problem

    config.stash[_PROBLEM] = cuda_runtime_problem()


_PROBLEM = pytest.StashKey[object]()


def pytest_runtest_setup(item):
    problem = item.config.stash.get(_PROBLEM, None)
    if problem is not None and "gpu" in item.keywords:
        pytest.fail(f"NVML sees a GPU but TVM cannot run CUDA kernels: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("builds")
