"""Block-sparse FlashAttention-2 kernels in Triton: forward, dK/dV, dQ.

Algorithm (Dao 2023, FlashAttention-2, https://arxiv.org/abs/2307.08691), restricted to the
tiles a pattern needs:

* forward -- one program per (query block, batch x head). It walks only its row's key blocks
  (``row_ptr``/``cols`` of :class:`~._tables.KernelTables`), keeps the running maximum ``m``,
  normalizer ``l`` and unnormalized output in registers, and writes ``out`` and the natural
  log-sum-exp. Scores are kept in base 2 (``exp2``), the scale folded into ``log2(e)``.
* dK/dV -- one program per (key block, batch x key/value head). It walks its column's query
  blocks (``col_ptr``/``rows``) for every query head of its group (GQA without atomics) and
  recomputes ``p = exp(s - lse)``.
* dQ -- one program per (query block, batch x head), over the row's key blocks again.

A tile whose mask index is ``-1`` is full: it runs with no element mask (its mask load is
predicated off). Other tiles read their ``BLOCK_Q x BLOCK_K`` int8 element mask. Rows that see
no key keep ``l == 0``: their output is 0 and their log-sum-exp ``-inf``, never NaN; the
backward gives them ``p == 0`` by recomputing against ``+inf``.

Written for real GPUs: every ``tl.dot`` operand is at least 16 x 16 and a power of two
(head dims are padded to ``BLOCK_D``), the mask table is int8, and nothing relies on the
interpreter. Offsets into the tensors are int64 (a ``(B, H, N, D)`` tensor passes 2^31
elements at B=1, H=32, D=128 and N of about 512k), and the grid is one axis of
``blocks x (batch x heads)`` programs (CUDA caps the second and third axes at 65,535; the
host declines grids past the first axis's 2^31 - 1). Float32 inputs use IEEE products (no
TF32), so float32 results are float32-exact.
"""

import triton
import triton.language as tl


@triton.jit
def _load_tile(base, rows, stride, n_rows, width, BLOCK_W: tl.constexpr):
    """Rows ``rows`` (``< n_rows``) of a row-major ``(*, width)`` matrix, zero-padded to ``BLOCK_W``."""
    cols = tl.arange(0, BLOCK_W)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < width)
    return tl.load(base + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=inside, other=0.0)


@triton.jit
def _store_tile(base, rows, stride, n_rows, width, value, BLOCK_W: tl.constexpr):
    """Write ``value`` into rows ``rows`` of a ``(*, width)`` matrix (padding dropped)."""
    cols = tl.arange(0, BLOCK_W)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < width)
    offsets = rows[:, None].to(tl.int64) * stride + cols[None, :]
    tl.store(base + offsets, value.to(base.dtype.element_ty), mask=inside)


@triton.jit
def _program(blocks):
    """This program's (block, batch x head) on the one-axis grid ``blocks * (B * heads)``
    (consecutive programs share a head, so its keys stay in cache); the second is int64, so
    every offset computed from it is."""
    pid = tl.program_id(0)
    return pid % blocks, (pid // blocks).to(tl.int64)


@triton.jit
def _query_program(H, G, N, BLOCK_Q: tl.constexpr):
    """This program's (batch x head, batch, head, key/value head, query block, query rows)."""
    r, bh = _program(tl.cdiv(N, BLOCK_Q))
    h = bh % H
    return bh, bh // H, h, h // G, r, r * BLOCK_Q + tl.arange(0, BLOCK_Q)


@triton.jit
def _row_stats(LSE, DELTA, offset, rows_q, N):
    """Base-2 log-sum-exp (``+inf`` for rows that see nothing or lie past ``N``: then
    ``p = exp2(s - lse) = 0``) and softmax correction of the rows ``rows_q``."""
    lse = tl.load(LSE + offset + rows_q, mask=rows_q < N, other=float("inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + offset + rows_q, mask=rows_q < N, other=0.0)
    return lse, delta


@triton.jit
def _scores(
    q, k, cols_k, rows_q, N, S, mask_ptr, mask_id, scale_log2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Base-2 scores of one tile, -inf where the pattern or the matrix edge forbids."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    inside = (rows_q[:, None] < N) & (cols_k[None, :] < S)
    tile = tl.arange(0, BLOCK_Q)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    # a full tile (mask_id == -1) reads no mask: its load is predicated off
    allowed = tl.load(
        mask_ptr + tl.maximum(mask_id, 0) * (BLOCK_Q * BLOCK_K) + tile, mask=mask_id >= 0, other=1
    )
    return tl.where(inside & (allowed != 0), s, float("-inf"))


@triton.jit
def _key_block(
    e, q, rows_q, k_base, v_base, skn, svn, COLS, IDS, MASKS, N, S, D, DV, scale_log2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Entry ``e`` of a query block's row list: its keys, values and base-2 scores.
    ``IDS`` points at this batch item's mask indices."""
    cols_k = tl.load(COLS + e) * BLOCK_K + tl.arange(0, BLOCK_K)
    k = _load_tile(k_base, cols_k, skn, S, D, BLOCK_D)
    v = _load_tile(v_base, cols_k, svn, S, DV, BLOCK_DV)
    mask_id = tl.load(IDS + e)
    s = _scores(q, k, cols_k, rows_q, N, S, MASKS, mask_id, scale_log2, BLOCK_Q, BLOCK_K, PRECISION)
    return k, v, s


@triton.jit
def _forward(
    Q, K, V, O, LSE,
    ROW_PTR, COLS, IDS, MASKS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    ids_b, H, G, N, S, D, DV, scale_log2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    bh, b, h, hk, r, rows_q = _query_program(H, G, N, BLOCK_Q)
    q = _load_tile(Q + b * sqb + h * sqh, rows_q, sqn, N, D, BLOCK_D)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for e in range(tl.load(ROW_PTR + r), tl.load(ROW_PTR + r + 1)):
        _, v, s = _key_block(
            e, q, rows_q, k_base, v_base, skn, svn, COLS, IDS + b * ids_b, MASKS, N, S, D, DV, scale_log2,
            BLOCK_Q, BLOCK_K, BLOCK_D, BLOCK_DV, PRECISION,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m - shift)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    seen = l > 0.0
    l_safe = tl.where(seen, l, 1.0)
    lse = tl.where(seen, (m + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    _store_tile(O + b * sob + h * soh, rows_q, son, N, DV, acc / l_safe[:, None], BLOCK_DV)
    tl.store(LSE + bh * N + rows_q, lse, mask=rows_q < N)


@triton.jit
def _backward_kv(
    Q, K, V, DO, LSE, DELTA, DK, DV_,
    COL_PTR, ROWS, IDS, MASKS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    ids_b, H, HKV, G, N, S, D, DV, scale, scale_log2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    c, bhk = _program(tl.cdiv(S, BLOCK_K))
    b = bhk // HKV
    hk = bhk % HKV
    cols_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
    k = _load_tile(K + b * skb + hk * skh, cols_k, skn, S, D, BLOCK_D)
    v = _load_tile(V + b * svb + hk * svh, cols_k, svn, S, DV, BLOCK_DV)
    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_DV], tl.float32)
    lo = tl.load(COL_PTR + c)
    hi = tl.load(COL_PTR + c + 1)
    for g in range(G):
        h = hk * G + g
        for e in range(lo, hi):
            mask_id = tl.load(IDS + b * ids_b + e)
            rows_q = tl.load(ROWS + e) * BLOCK_Q + tl.arange(0, BLOCK_Q)
            q = _load_tile(Q + b * sqb + h * sqh, rows_q, sqn, N, D, BLOCK_D)
            do = _load_tile(DO + b * sdb + h * sdh, rows_q, sdn, N, DV, BLOCK_DV)
            lse, delta = _row_stats(LSE, DELTA, (b * H + h) * N, rows_q, N)
            s = _scores(q, k, cols_k, rows_q, N, S, MASKS, mask_id, scale_log2, BLOCK_Q, BLOCK_K, PRECISION)
            p = tl.exp2(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    _store_tile(DK + b * skb + hk * skh, cols_k, skn, S, D, dk * scale, BLOCK_D)
    _store_tile(DV_ + b * svb + hk * svh, cols_k, svn, S, DV, dv, BLOCK_DV)


@triton.jit
def _backward_q(
    Q, K, V, DO, LSE, DELTA, DQ,
    ROW_PTR, COLS, IDS, MASKS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    ids_b, H, G, N, S, D, DV, scale, scale_log2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    bh, b, h, hk, r, rows_q = _query_program(H, G, N, BLOCK_Q)
    q = _load_tile(Q + b * sqb + h * sqh, rows_q, sqn, N, D, BLOCK_D)
    do = _load_tile(DO + b * sdb + h * sdh, rows_q, sdn, N, DV, BLOCK_DV)
    lse, delta = _row_stats(LSE, DELTA, bh * N, rows_q, N)
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for e in range(tl.load(ROW_PTR + r), tl.load(ROW_PTR + r + 1)):
        k, v, s = _key_block(
            e, q, rows_q, k_base, v_base, skn, svn, COLS, IDS + b * ids_b, MASKS, N, S, D, DV, scale_log2,
            BLOCK_Q, BLOCK_K, BLOCK_D, BLOCK_DV, PRECISION,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_tile(DQ + b * sqb + h * sqh, rows_q, sqn, N, D, dq * scale, BLOCK_D)
