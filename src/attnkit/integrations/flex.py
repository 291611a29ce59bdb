"""attnkit patterns on PyTorch's FlexAttention (``torch.nn.attention.flex_attention``).

    from attnkit.integrations.flex import block_mask
    bm = block_mask(pattern, N, S)                 # a flex_attention BlockMask
    out = torch.compile(flex_attention)(q, k, v, block_mask=bm)

:func:`block_mask` builds the ``BlockMask`` from the pattern's exact block map (no ``N x S``
evaluation, no compile step for the mask); :func:`mask_mod` is the pattern's element rule in
FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` form, traceable for any pattern. Both are
the ones attnkit's own ``flex`` backend runs on (:mod:`attnkit.backends._flex_mask`).
"""

from ..backends._flex_mask import block_mask, mask_mod

__all__ = ["block_mask", "mask_mod"]
