"""attnkit patterns on FlexAttention, checked on CPU against ``to_dense`` and attnkit itself."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnkit import attention
from attnkit import patterns as P
from attnkit.integrations.flex import block_mask, mask_mod

flex = pytest.importorskip("torch.nn.attention.flex_attention")

PATTERNS = [
    P.SlidingWindow(32, 32) | P.Global((0, 5)) | P.Random(2, 64, seed=1),
    P.Document((100, 200)) & P.Causal(),
    P.Strided(24) & P.Causal(),
    P.Dilated(40, 4, 8),
    P.Causal(),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_mask_mod_equals_to_dense(pattern):
    rule = mask_mod(pattern, 300, 300, block=128)
    got = rule(torch.tensor(0), torch.tensor(0), torch.arange(300)[:, None], torch.arange(300)[None, :])
    assert torch.equal(got, pattern.to_dense(300, 300))


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_block_mask_equals_flex_create_block_mask(pattern):
    ours = block_mask(pattern, 300, 300)
    theirs = flex.create_block_mask(mask_mod(pattern, 300, 300), None, None, 300, 300, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_flex_attention_with_our_block_mask_equals_attnkit(pattern):
    q, k, v = (torch.randn(1, 2, 300, 32) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns when run uncompiled
        out = flex.flex_attention(q, k, v, block_mask=block_mask(pattern, 300, 300))
    assert (out - attention(q, k, v, pattern=pattern)).abs().max() < 1e-5


def test_per_batch_patterns_give_one_mask_per_batch_item():
    pattern = P.KeyPadding((300, 120)) & P.Causal()
    bm = block_mask(pattern, 300, 300, num_heads=2)
    assert bm.kv_num_blocks.shape == (2, 2, 3)
    q, k, v = (torch.randn(2, 2, 300, 32) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex.flex_attention(q, k, v, block_mask=bm)
    assert (out - attention(q, k, v, pattern=pattern)).abs().max() < 1e-5


def test_per_head_patterns_give_each_head_its_mask():
    pattern = P.PerHead([P.Causal(), P.SlidingWindow(40) | P.Global((0,)), P.Causal()])
    rule = mask_mod(pattern, 300, 300)
    h = torch.arange(3)[:, None, None]
    got = rule(torch.tensor(0), h, torch.arange(300)[None, :, None], torch.arange(300)[None, None, :])
    assert torch.equal(got, pattern.to_dense(300, 300)[0])
    ours = block_mask(pattern, 300, 300)
    theirs = flex.create_block_mask(rule, None, 3, 300, 300, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    q, k, v = (torch.randn(1, 3, 300, 32) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex.flex_attention(q, k, v, block_mask=ours)
    assert (out - attention(q, k, v, pattern=pattern)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="expected num_heads=None or 3"):
        block_mask(pattern, 300, 300, num_heads=2)


def test_the_mask_cache_counts_the_tables_a_mask_holds():
    """``sys.getsizeof`` of a BlockMask is a few dozen bytes whatever its tables hold, so a cache
    counting that never evicts; the flex backend's cache counts the tensors."""
    import sys

    from attnkit.backends._flex_mask import block_mask_bytes

    n, block = 4096, 128
    m = block_mask(P.SlidingWindow(100) | P.Global((0,)), n, n, block=block)
    tables = sum(t.numel() * t.element_size() for t in (m.kv_num_blocks, m.kv_indices))
    # at least the block tables and the partial tiles' element masks the mask_mod reads
    assert block_mask_bytes(m) > tables + 32 * block * block
    assert sys.getsizeof(m) < 1000 < block_mask_bytes(m)
    from attnkit.backends.flex import _BLOCK_MASKS

    assert _BLOCK_MASKS._size(m) == block_mask_bytes(m)


def test_mask_mod_keeps_the_lengths_as_tensors():
    """torch.compile guards on Python ints a mask_mod captures (a new length compiles again);
    the lengths live in tensors, and the rule is right at both ends of the matrix."""
    rule = mask_mod(P.SlidingWindow(3), 10, 7, block=4)
    captured = [c.cell_contents for c in rule.__closure__]
    assert not any(isinstance(v, int) and v in (10, 7, 9, 6) for v in captured)
    q, k = torch.arange(12)[:, None], torch.arange(9)[None, :]
    got = rule(torch.tensor(0), torch.tensor(0), q, k)
    want = torch.zeros(12, 9, dtype=torch.bool)
    want[:10, :7] = P.SlidingWindow(3).to_dense(10, 7)
    assert torch.equal(got, want)
