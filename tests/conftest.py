"""Test set-up: Triton kernels run under the numpy interpreter unless a GPU run says otherwise.

TRITON_INTERPRET must be set before Triton is imported; benchmarks/gpu_check.sh sets it to 0.
"""
import importlib.util
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: slower CPU test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton path (interpreted on CPU) for the duration of a test.

    Every test that uses it passes CPU tensors, which the Triton path runs only under the
    interpreter; a GPU run (TRITON_INTERPRET=0, benchmarks/gpu_check.sh) skips them instead of
    failing with "MTP_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1"."""
    from mtp_kernels.backend import interpreting

    if not interpreting():
        pytest.skip("Triton path on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("MTP_BACKEND", "triton")
    yield


@pytest.fixture
def load_script(monkeypatch):
    """Import a script (a benchmark) as a module for the duration of a test: its imports of sibling
    modules resolve, and sys.path and the script's own sys.modules entry are restored afterwards
    (siblings it imports, such as benchmarks/common.py, stay imported under their own names)."""
    def load(path):
        monkeypatch.syspath_prepend(str(path.parent))
        spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)   # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
        return module
    return load
