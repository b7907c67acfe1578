"""Shared helpers for the Python tests: run with pytest from python/tests (ctest does, with
POLYAK_LIBRARY set to the build tree's libpolyak)."""
import array
import math
import random

import pytest

try:  # one thread: the test machines are small and shared, and threads fight there
    import torch
    torch.set_num_threads(1)
except ImportError:
    pass


def warmup_beta(t, beta, beta_min=0.0, inv_gamma=1.0, power=2 / 3):
    """timm's / diffusers' / ema-pytorch's warm-up decay, as they publish it."""
    return 0.0 if t <= 0 else min(beta, max(beta_min, 1 - (1 + t / inv_gamma) ** -power))


@pytest.fixture
def rng():
    return random.Random(11)


def close(a, b, rel=1e-12):
    return math.isclose(a, b, rel_tol=rel, abs_tol=rel)


def buffer(values, typecode="f"):
    """A host array and its address."""
    a = array.array(typecode, values)
    return a, a.buffer_info()[0]
