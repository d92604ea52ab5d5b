"""The preallocated KV cache: in-place writes, a length, growth only when asked, clear errors."""

import numpy as np
import pytest

from stablelm_ref.errors import GenerationError
from stablelm_ref.kv_cache import KVCache

from conftest import tiny_config, tiny_model


def test_writes_in_place_and_returns_views(xp):
    config = tiny_config(num_key_value_heads=2)
    cache = KVCache(config, 1, 6, xp.float64, xp)
    k = xp.ones((1, 2, 4, 16), dtype=xp.float64)
    keys, values = cache.update(0, k, 2 * k)
    cache.advance(4)
    assert keys.shape == (1, 2, 4, 16) and cache.get_seq_length() == 4
    keys, _ = cache.update(0, 3 * xp.ones((1, 2, 1, 16), dtype=xp.float64), k[:, :, :1, :])
    assert keys.shape == (1, 2, 5, 16)
    assert float(keys[0, 0, 4, 0]) == 3.0 and float(keys[0, 0, 0, 0]) == 1.0
    assert cache.nbytes() == 2 * 2 * 2 * 6 * 16 * 8


def test_full_cache_is_a_clear_error():
    model = tiny_model()
    cache = KVCache(model.config, 1, 4, np.float64, np)
    model([[1, 2, 3]], past_key_values=cache, use_cache=True)
    with pytest.raises(GenerationError, match="holds 4 positions"):
        model([[4, 5]], past_key_values=cache, use_cache=True)


def test_implicit_cache_grows_and_stays_correct():
    model = tiny_model()
    ids = np.arange(2, 14)[None]
    out = model(ids[:, :2], use_cache=True)
    cache = out.past_key_values
    assert cache.max_len == 2
    for i in range(2, 12):
        out = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
    assert cache.max_len >= 12 and cache.length == 12
    np.testing.assert_allclose(out.logits[:, -1], model(ids).logits[:, -1], rtol=0, atol=1e-10)
