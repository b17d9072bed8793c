"""Test-session setup.

* Importing triton (pulled in by torch/torchvision/timm/effdet) after TensorFlow segfaults the
  process, so the torch stack is imported first, before any test module imports TensorFlow.
* Nothing is downloaded: hub access is switched off for the random-init reference models.
* TensorFlow stays on the host CPU and quiet.
* Every test (and every module's fixtures) starts from the same torch and NumPy global random state:
  a reference model built with torch's default initialisation is then the same network whether
  the test runs alone or after others in an xdist worker (it used to depend on the test order).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TF/torch never grab an accelerator in tests
# Train/eval tests compile the same small steps several times: share compilations within the session
# (and remove them at exit: ~100 MB a run would otherwise pile up in /tmp on a CI machine).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _session_cache = tempfile.mkdtemp(prefix="scaledet_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

try:  # noqa: SIM105 - the import order is the point
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:  # runtime-only install: parity tests against torch skip themselves
    pass


import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _seed_global_generators() -> None:
    np.random.seed(0)
    if "torch" in globals():
        torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _seeded_module():
    _seed_global_generators()


@pytest.fixture(autouse=True)
def _seeded_test(_seeded_module):
    _seed_global_generators()
