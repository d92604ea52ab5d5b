"""bounded_io's memory guard on the GPU side, with a stand-in for CuPy's module (runs on the CPU).

device_memory(xp) is what check_memory compares a GPU allocation with: the driver's free bytes plus the
free blocks CuPy's memory pool keeps cached (CuPy reuses those before asking the driver, so a model that
freed arrays can still allocate them). tests/gpu exercises the real CuPy module.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from stablelm_ref import bounded_io
from stablelm_ref.errors import GenerationError

GiB = 2**30


class FakePool:
    def __init__(self, total, used):
        self.total, self.used = total, used

    def total_bytes(self):
        return self.total

    def used_bytes(self):
        return self.used


def fake_cupy(free, pool=None):
    """The parts of CuPy's module device_memory reads: cuda.runtime.memGetInfo() -> (free, total), and the
    default memory pool (None: a module without one)."""
    module = SimpleNamespace(cuda=SimpleNamespace(runtime=SimpleNamespace(memGetInfo=lambda: (free, 80 * GiB))))
    if pool is not None:
        module.get_default_memory_pool = lambda: pool
    return module


def test_device_memory_counts_the_pools_cached_free_blocks():
    assert bounded_io.device_memory(fake_cupy(3 * GiB, FakePool(total=10 * GiB, used=4 * GiB))) == 9 * GiB
    assert bounded_io.device_memory(fake_cupy(3 * GiB, FakePool(total=10 * GiB, used=10 * GiB))) == 3 * GiB
    assert bounded_io.device_memory(fake_cupy(3 * GiB)) == 3 * GiB            # no pool: the driver's figure


def test_device_memory_is_unknown_for_other_modules():
    assert bounded_io.device_memory(np) is None
    assert bounded_io.device_memory(SimpleNamespace()) is None


def test_an_allocation_the_pool_can_serve_is_not_refused(monkeypatch):
    """8 GiB wanted, 3 GiB free on the device, 6 GiB cached in the pool: CuPy can serve it. Before, the guard
    compared with the driver's 3 GiB and refused. 10 GiB is still refused, naming the 9 GiB there are."""
    monkeypatch.setattr(bounded_io, "available_memory", lambda: 1 * GiB)      # the host's: not what counts here
    xp = fake_cupy(3 * GiB, FakePool(total=10 * GiB, used=4 * GiB))
    bounded_io.check_memory(8 * GiB, "the KV cache", GenerationError, xp=xp)
    with pytest.raises(GenerationError, match=r"^the KV cache needs 10.0 GiB but only 9.0 GiB of memory is free"):
        bounded_io.check_memory(10 * GiB, "the KV cache", GenerationError, xp=xp)
