"""Triton kernels for fused neighborhood attention with relative positional bias (SPEC section 1).

Written by hand because no maintained library has them: NATTEN >= 0.20 dropped the bias, and
flex_attention sees the neighborhood only as a block-sparse mask over the flattened sequence.

Layout: q, k, v, out are tokens-first (B, H, W, heads, D) with unit stride over D; the log-sum-exp
(base 2) and the backward's ``delta`` are (B, H, W, heads) float32.

Tiling. Along one axis a dilation group is every ``dilation``-th position; its positions are
"places" 0..n-1 and a query at place p attends places start(p) .. start(p)+k-1 (start clamped at the
borders, :func:`_window_start`). A query program owns BLOCK_M consecutive places of one column group
in ROWS consecutive places of one row group. Along a row, its queries' keys lie within
BLOCK_N >= BLOCK_M + kw - 1 consecutive places; across rows, its queries attend ROWS + kh - 1 key
rows at most (each row place's window starts 0 or 1 place after the previous one's). So the forward
is one step of online softmax per key row over a (ROWS * BLOCK_M x BLOCK_N) tile, masked to each
query's kw keys in the rows of its window: dilation costs nothing (it is a stride), and the tile
does (ROWS + kh - 1) / kh * BLOCK_N / kw times the minimal work instead of the flattened sequence's
whole rows of keys. ROWS > 1 loads each key row once for several query rows (each key row is
needed by kh query rows): (ROWS + kh - 1) / (ROWS * kh) as many loads as ROWS = 1, for
(ROWS + kh - 1) / kh times its products.

The key-side backward mirrors it: a program owns BLOCK_N key places of one column group in ROWS row
places, and visits every query row that attends one of its key rows (ROWS + kh - 1 of them inside
the image, more at the borders), with query tiles covering the queries whose windows reach its keys
(one or two: see _key_columns), in one loop over (query row, query tile) that Triton pipelines.

The unfused ops' three primitives (dot, weighted sum, scatter) at the end reuse the same tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # logits are kept in base 2 (exp2)


@triton.jit
def _window_start(place, group_len, KERNEL: tl.constexpr):
    """First place of the window of ``place`` in a group of ``group_len`` places."""
    return tl.minimum(tl.maximum(place - KERNEL // 2, 0), group_len - KERNEL)


@triton.jit
def _group_len(extent, group, dilation):
    return (extent - group + dilation - 1) // dilation


@triton.jit
def _tokens(base, b, rows, n, cols, d, s_b, s_h, s_w, s_n):
    """Pointers to the features d of tokens (b, rows[i], cols[i], head n) of a (B, H, W, heads, D)
    tensor (64-bit row and head offsets: one image's tokens may span over 2**31 elements; within a
    row, 32 bits)."""
    return base + b * s_b + n.to(tl.int64) * s_n + rows[:, None].to(tl.int64) * s_h + cols[:, None] * s_w + d[None, :]


@triton.jit
def _statistic(b, rows, cols, n, height, width, heads):
    """Offsets of tokens (b, rows[i], cols[i], head n) in a (B, H, W, heads) float32 statistic (the
    log-sum-exp, delta), contiguous."""
    return ((b * height + rows) * width + cols) * heads + n


@triton.jit
def _same_row(row, cols):
    """``row`` for each of ``cols`` (tokens of one row, for :func:`_tokens`)."""
    return tl.zeros_like(cols) + row


@triton.jit
def _query_tile(pid_col, width, dil_w, c, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KW: tl.constexpr):
    """Places ``c`` (of 0..BLOCK_M-1) of a query program's BLOCK_M places of one column group, and
    the BLOCK_N key places they need along a row.

    Returns (query columns, query places, query valid, window start of each query, first key place,
    key places, key columns, key valid, in_window: (queries x keys) mask of each query's kw keys).
    """
    group = pid_col % dil_w
    n = _group_len(width, group, dil_w)
    first = (pid_col // dil_w) * BLOCK_M
    place = first + c
    valid = place < n
    start = _window_start(place, n, KW)
    key_first = _window_start(first, n, KW)
    key_place = key_first + tl.arange(0, BLOCK_N)
    rel = key_place[None, :] - start[:, None]
    in_window = (rel >= 0) & (rel < KW) & valid[:, None]
    return (group + dil_w * place, place, valid, start, key_first,
            key_place, group + dil_w * key_place, key_place < n, in_window)  # fmt: skip


@triton.jit
def _row_group(pid_row, height, dil_h, ROWS: tl.constexpr):
    """Row program ``pid_row``'s row group, that group's length and the program's first place in it
    (a program owns ROWS consecutive places of one group)."""
    group = pid_row % dil_h
    return group, _group_len(height, group, dil_h), (pid_row // dil_h) * ROWS


@triton.jit
def _program_rows(pid_row, height, dil_h, t, ROWS: tl.constexpr, KH: tl.constexpr):
    """Rows ``t`` (of 0..ROWS-1) of a program's ROWS consecutive places of one row group: (row, row
    place, valid, first place of its window of kh key rows)."""
    group, group_len, first = _row_group(pid_row, height, dil_h, ROWS)
    place = first + t
    return group + dil_h * place, place, place < group_len, _window_start(place, group_len, KH)


@triton.jit
def _attended_rows(pid_row, height, dil_h, ROWS: tl.constexpr, KH: tl.constexpr):
    """The key rows a query program's rows attend: (row group, first key row place, how many). The
    windows of consecutive places start 0 or 1 place apart, so ROWS + KH - 1 rows at most; none for
    a program past its group's end."""
    group, group_len, first = _row_group(pid_row, height, dil_h, ROWS)
    last = tl.minimum(first + ROWS, group_len) - 1
    start = _window_start(first, group_len, KH)
    return group, start, tl.where(first < group_len, _window_start(last, group_len, KH) + KH - start, 0)


@triton.jit
def _query_program(height, width, dil_h, dil_w, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   KH: tl.constexpr, KW: tl.constexpr):  # fmt: skip
    """A query program's ROWS * BLOCK_M queries, row by row (program ids 1 and 2; see _query_tile
    and _program_rows), and the key rows they attend.

    Returns (columns, places, window starts along the row, first key place, key places, key columns,
    key valid, in_cols: each query's kw keys along a row, rows, row places, row valid, first key row
    place of each query's window, row group, first key row place, key row count, query valid, rpb
    column of each (query, key): the key's offset from the query).
    """
    tok = tl.arange(0, ROWS * BLOCK_M)
    cols, place, col_valid, start, key_first, key_place, key_cols, key_valid, in_cols = _query_tile(
        tl.program_id(2), width, dil_w, tok % BLOCK_M, BLOCK_M, BLOCK_N, KW
    )
    rows, row_place, row_valid, row_start = _program_rows(tl.program_id(1), height, dil_h, tok // BLOCK_M, ROWS, KH)
    row_group, key_row_first, key_row_count = _attended_rows(tl.program_id(1), height, dil_h, ROWS, KH)
    bias_col = key_place[None, :] - place[:, None] + KW - 1
    return (cols, place, start, key_first, key_place, key_cols, key_valid, in_cols, rows, row_place, row_valid,
            row_start, row_group, key_row_first, key_row_count, col_valid & row_valid, bias_col)  # fmt: skip


@triton.jit
def _reaching_queries(first, last, group_len, KERNEL: tl.constexpr):
    """(lo, hi): the query places whose windows reach key places first..last along one axis (the
    window start is monotone in the place, in steps of 0 or 1)."""
    lo = tl.where(first < KERNEL, 0, first - KERNEL // 2)
    hi = tl.where(last >= group_len - KERNEL, group_len - 1, last + KERNEL // 2)
    return lo, hi


@triton.jit
def _reaching_rows(pid_row, height, dil_h, ROWS: tl.constexpr, KH: tl.constexpr):
    """The query rows whose windows reach a key program's ROWS row places: (row group, group length,
    first and last query row place; last < first for a program past its group's end)."""
    group, group_len, first = _row_group(pid_row, height, dil_h, ROWS)
    lo, hi = _reaching_queries(first, tl.minimum(first + ROWS, group_len) - 1, group_len, KH)
    return group, group_len, lo, tl.where(first < group_len, hi, lo - 1)


@triton.jit
def _key_columns(pid_col, width, dil_w, c, BLOCK_N: tl.constexpr, KW: tl.constexpr):
    """Places ``c`` (of 0..BLOCK_N-1) of a key program's BLOCK_N places of one column group, and
    the query places that reach them: BLOCK_N + KW - 1 places inside the group, more at a border,
    where a clamped window reaches further (up to the whole group when one program's keys are near
    both borders). The kernels cover them with as many tiles of BLOCK_M = next_pow2(BLOCK_N + KW - 1)
    places as the range needs: one inside the group, sometimes two at a border (tile 8 at kw=7:
    17 places when the group ends 14 places after the program's first).

    Returns (column group, group length, key places, key valid, query place range lo/hi).
    """
    group = pid_col % dil_w
    group_len = _group_len(width, group, dil_w)
    key_first = (pid_col // dil_w) * BLOCK_N
    key_place = key_first + c
    query_lo, query_hi = _reaching_queries(key_first, tl.minimum(key_first + BLOCK_N, group_len) - 1, group_len, KW)
    return group, group_len, key_place, key_place < group_len, query_lo, query_hi


@triton.jit
def _logits(a, b, bias_ptrs, in_window, scale_log2, HAS_RPB: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits a @ b.T of a tile plus the rpb entries at ``bias_ptrs``, -inf outside the windows."""
    s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale_log2
    if HAS_RPB:
        s += tl.load(bias_ptrs, mask=in_window, other=0.0).to(tl.float32) * LOG2E
    return tl.where(in_window, s, float("-inf"))


@triton.jit
def na2d_forward_kernel(
    Q, K, V, RPB, OUT, LSE,
    q_sb, q_sh, q_sw, q_sn,
    k_sb, k_sh, k_sw, k_sn,
    v_sb, v_sh, v_sw, v_sn,
    o_sb, o_sh, o_sw, o_sn,
    r_sn, r_sh,
    heads, height, width, head_dim, dil_h, dil_w, scale_log2,
    KH: tl.constexpr, KW: tl.constexpr, HAS_RPB: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tl.static_assert(ROWS * BLOCK_M >= 16, "tl.dot needs 16 queries per program: ROWS * tile >= 16")
    pid_bn = tl.program_id(0)
    b, n = (pid_bn // heads).to(tl.int64), pid_bn % heads
    (cols, place, _, _, key_place, key_cols, key_valid, in_cols, rows, row_place, row_valid, row_start,
     row_group, key_row_first, key_row_count, valid, bias_col) = _query_program(
        height, width, dil_h, dil_w, ROWS, BLOCK_M, BLOCK_N, KH, KW
    )  # fmt: skip

    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_mask = valid[:, None] & d_ok[None, :]
    q = tl.load(_tokens(Q, b, rows, n, cols, d, q_sb, q_sh, q_sw, q_sn), mask=q_mask, other=0.0)
    m = tl.full([ROWS * BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([ROWS * BLOCK_M], tl.float32)
    acc = tl.zeros([ROWS * BLOCK_M, BLOCK_D], tl.float32)
    kv_mask = key_valid[:, None] & d_ok[None, :]
    for j in range(key_row_count):
        key_row_place = key_row_first + j
        key_rows = _same_row(row_group + dil_h * key_row_place, key_cols)
        k = tl.load(_tokens(K, b, key_rows, n, key_cols, d, k_sb, k_sh, k_sw, k_sn), mask=kv_mask, other=0.0)
        window_row = key_row_place - row_start  # this key row's index in each query's window
        in_window = in_cols & ((window_row >= 0) & (window_row < KH) & row_valid)[:, None]
        bias_row = key_row_place - row_place + KH - 1
        bias_ptrs = RPB + n * r_sn + bias_row[:, None] * r_sh + bias_col
        s = _logits(q, k, bias_ptrs, in_window, scale_log2, HAS_RPB, PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # queries with no key yet stay empty
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(_tokens(V, b, key_rows, n, key_cols, d, v_sb, v_sh, v_sw, v_sn), mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    l_safe = tl.where(valid, l_sum, 1.0)
    out = acc / l_safe[:, None]
    tl.store(_tokens(OUT, b, rows, n, cols, d, o_sb, o_sh, o_sw, o_sn), out.to(OUT.dtype.element_ty), mask=q_mask)
    tl.store(LSE + _statistic(b, rows, cols, n, height, width, heads), m + tl.log2(l_safe), mask=valid)


@triton.jit
def na2d_backward_query_kernel(
    Q, K, V, RPB, DO, OUT, LSE, DELTA, DQ, DRPB,
    q_sb, q_sh, q_sw, q_sn,
    k_sb, k_sh, k_sw, k_sn,
    v_sb, v_sh, v_sw, v_sn,
    do_sb, do_sh, do_sw, do_sn,
    o_sb, o_sh, o_sw, o_sn,
    g_sb, g_sh, g_sw, g_sn,
    r_sn, r_sh, drpb_slots,
    heads, height, width, head_dim, dil_h, dil_w, scale_log2, scale,
    KH: tl.constexpr, KW: tl.constexpr, HAS_RPB: tl.constexpr, BIAS_COLS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq (strides g_*) and, with rpb, this program's partial rpb gradient; first DELTA, its
    queries' DO . OUT in float32 (the softmax gradient's row sums), which the key kernel reads after.

    DRPB is (B*heads, H, drpb_slots, KH, 2*KW-1), zeros where tiles larger than the smallest leave
    slots unwritten (see triton_na._backward_kernels): for each of its query rows, program
    (b, n, rows, column program c) writes slot c (drpb_slots is the column program count of the
    smallest tile, so any tile fits); the rows are the query row's kh key rows, the caller maps them
    to rpb rows and sums over the rest (deterministic, no atomics).
    """
    tl.static_assert(ROWS * BLOCK_M >= 16, "tl.dot needs 16 queries per program: ROWS * tile >= 16")
    pid_bn, pid_row, pid_col = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, n = (pid_bn // heads).to(tl.int64), pid_bn % heads
    (cols, place, start, key_first, key_place, key_cols, key_valid, in_cols, rows, row_place, row_valid, row_start,
     row_group, key_row_first, key_row_count, valid, bias_col) = _query_program(
        height, width, dil_h, dil_w, ROWS, BLOCK_M, BLOCK_N, KH, KW
    )  # fmt: skip
    # Bias column c of query j is the key at place place_j + c - (kw - 1): its index in the tile,
    # and whether it is in the query's window (a gather then sums the rpb gradient per column).
    bias_cols = tl.arange(0, BIAS_COLS)
    bias_place = place[:, None] + bias_cols[None, :] - (KW - 1)
    bias_rel = bias_place - start[:, None]
    bias_ok = (bias_rel >= 0) & (bias_rel < KW) & valid[:, None]
    bias_key = tl.where(bias_ok, bias_place - key_first, 0)
    # the partial sums' slots of each of the program's rows (see the docstring)
    tile_rows, _, tile_row_valid, tile_row_start = _program_rows(pid_row, height, dil_h, tl.arange(0, ROWS), ROWS, KH)
    slots = (pid_bn.to(tl.int64) * height + tile_rows) * drpb_slots + pid_col

    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_mask = valid[:, None] & d_ok[None, :]
    q = tl.load(_tokens(Q, b, rows, n, cols, d, q_sb, q_sh, q_sw, q_sn), mask=q_mask, other=0.0)
    do = tl.load(_tokens(DO, b, rows, n, cols, d, do_sb, do_sh, do_sw, do_sn), mask=q_mask, other=0.0)
    out = tl.load(_tokens(OUT, b, rows, n, cols, d, o_sb, o_sh, o_sw, o_sn), mask=q_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
    token = _statistic(b, rows, cols, n, height, width, heads)
    tl.store(DELTA + token, delta, mask=valid)
    lse = tl.load(LSE + token, mask=valid, other=0.0)
    dq = tl.zeros([ROWS * BLOCK_M, BLOCK_D], tl.float32)
    kv_mask = key_valid[:, None] & d_ok[None, :]
    for j in range(key_row_count):
        key_row_place = key_row_first + j
        key_rows = _same_row(row_group + dil_h * key_row_place, key_cols)
        k = tl.load(_tokens(K, b, key_rows, n, key_cols, d, k_sb, k_sh, k_sw, k_sn), mask=kv_mask, other=0.0)
        v = tl.load(_tokens(V, b, key_rows, n, key_cols, d, v_sb, v_sh, v_sw, v_sn), mask=kv_mask, other=0.0)
        window_row = key_row_place - row_start  # this key row's index in each query's window
        row_ok = (window_row >= 0) & (window_row < KH) & row_valid
        bias_row = key_row_place - row_place + KH - 1
        bias_ptrs = RPB + n * r_sn + bias_row[:, None] * r_sh + bias_col
        s = _logits(q, k, bias_ptrs, in_cols & row_ok[:, None], scale_log2, HAS_RPB, PRECISION)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # gradient of the logits
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if HAS_RPB:
            by_column = tl.where(bias_ok & row_ok[:, None], tl.gather(ds, bias_key, 1), 0.0)
            partial = tl.sum(tl.reshape(by_column, (ROWS, BLOCK_M, BIAS_COLS)), 1)  # per row of the tile
            tile_window_row = key_row_place - tile_row_start
            tile_row_ok = tile_row_valid & (tile_window_row >= 0) & (tile_window_row < KH)
            partial_ptrs = DRPB + ((slots * KH + tile_window_row) * (2 * KW - 1))[:, None] + bias_cols[None, :]
            tl.store(partial_ptrs, partial, mask=tile_row_ok[:, None] & (bias_cols < 2 * KW - 1)[None, :])
    dq_ptrs = _tokens(DQ, b, rows, n, cols, d, g_sb, g_sh, g_sw, g_sn)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def na2d_backward_key_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DK, DV,
    q_sb, q_sh, q_sw, q_sn,
    k_sb, k_sh, k_sw, k_sn,
    v_sb, v_sh, v_sw, v_sn,
    do_sb, do_sh, do_sw, do_sn,
    g_sb, g_sh, g_sw, g_sn,
    r_sn, r_sh,
    heads, height, width, head_dim, dil_h, dil_w, scale_log2, scale,
    KH: tl.constexpr, KW: tl.constexpr, HAS_RPB: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dk and dv (both with strides g_*) for BLOCK_N key places of ROWS rows of one row and column group."""
    tl.static_assert(ROWS * BLOCK_N >= 16, "tl.dot needs 16 keys per program: ROWS * tile >= 16")
    pid_bn, pid_row, pid_col = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, n = (pid_bn // heads).to(tl.int64), pid_bn % heads
    tok = tl.arange(0, ROWS * BLOCK_N)  # the program's keys, row by row
    group, group_len, key_place, col_valid, query_lo, query_hi = _key_columns(
        pid_col, width, dil_w, tok % BLOCK_N, BLOCK_N, KW
    )
    key_rows, key_row_place, key_row_valid, _ = _program_rows(pid_row, height, dil_h, tok // BLOCK_N, ROWS, KH)
    row_group, rows_len, row_lo, row_hi = _reaching_rows(pid_row, height, dil_h, ROWS, KH)
    key_valid = col_valid & key_row_valid
    key_cols = group + dil_w * key_place

    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    kv_mask = key_valid[:, None] & d_ok[None, :]
    k = tl.load(_tokens(K, b, key_rows, n, key_cols, d, k_sb, k_sh, k_sw, k_sn), mask=kv_mask, other=0.0)
    v = tl.load(_tokens(V, b, key_rows, n, key_cols, d, v_sb, v_sh, v_sw, v_sn), mask=kv_mask, other=0.0)
    dk = tl.zeros([ROWS * BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([ROWS * BLOCK_N, BLOCK_D], tl.float32)
    tiles = (query_hi - query_lo) // BLOCK_M + 1  # query tiles per row (see _key_columns)
    for step in range((row_hi - row_lo + 1) * tiles):  # one loop, which Triton pipelines
        query_row_place = row_lo + step // tiles
        place = query_lo + (step % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = place <= query_hi
        cols = group + dil_w * place
        window_row = key_row_place - _window_start(query_row_place, rows_len, KH)  # each key row's index
        row_ok = (window_row >= 0) & (window_row < KH) & key_valid
        rel = key_place[:, None] - _window_start(place, group_len, KW)[None, :]
        in_window = (rel >= 0) & (rel < KW) & valid[None, :] & row_ok[:, None]
        q_mask = valid[:, None] & d_ok[None, :]
        bias_col = key_place[:, None] - place[None, :] + KW - 1
        bias_ptrs = RPB + n * r_sn + (key_row_place - query_row_place + KH - 1)[:, None] * r_sh + bias_col
        rows = _same_row(row_group + dil_h * query_row_place, cols)
        q = tl.load(_tokens(Q, b, rows, n, cols, d, q_sb, q_sh, q_sw, q_sn), mask=q_mask, other=0.0)
        do = tl.load(_tokens(DO, b, rows, n, cols, d, do_sb, do_sh, do_sw, do_sn), mask=q_mask, other=0.0)
        token = _statistic(b, rows, cols, n, height, width, heads)
        lse = tl.load(LSE + token, mask=valid, other=0.0)
        delta = tl.load(DELTA + token, mask=valid, other=0.0)
        # transposed tile: keys x queries
        s = _logits(k, q, bias_ptrs, in_window, scale_log2, HAS_RPB, PRECISION)
        p = tl.exp2(s - lse[None, :])
        dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    dk_ptrs = _tokens(DK, b, key_rows, n, key_cols, d, g_sb, g_sh, g_sw, g_sn)
    dv_ptrs = _tokens(DV, b, key_rows, n, key_cols, d, g_sb, g_sh, g_sw, g_sn)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------------------------
# Maps whose dilation groups are single windows (grouped.is_whole): every query of a group attends
# every key of it, so one program holds a whole group, its kh*kw tokens padded to BLOCK, in one
# (BLOCK x BLOCK) tile: (kh*kw / BLOCK)**2 of the products are needed (49 of 64 at 7x7, against 49
# of 128 per query for the neighborhood kernels' tiles), and the tokens are read and written where
# they lie in the (B, H, W, heads, D) map, without gathering the groups into a batch first.


@triton.jit
def _group_places(KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    """A group's BLOCK padded places: (index t, t < kh*kw, place row, place column)."""
    t = tl.arange(0, BLOCK)
    return t, t < KH * KW, t // KW, t % KW


@triton.jit
def _group_tokens(group, t_row, t_col, dil_h, dil_w):
    """Rows and columns of the tokens at places (t_row, t_col) of dilation group ``group`` (row-major
    over the dil_h x dil_w groups)."""
    return group // dil_w + dil_h * t_row, group % dil_w + dil_w * t_col


@triton.jit
def _whole_logits(q, k, RPB, n, r_sn, r_sh, t_row, t_col, valid, scale_log2,
                  KH: tl.constexpr, KW: tl.constexpr, HAS_RPB: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """Base-2 logits of a group's queries (rows) and keys (columns), -inf at padding."""
    in_group = valid[:, None] & valid[None, :]
    bias_row = t_row[None, :] - t_row[:, None] + KH - 1
    bias_ptrs = RPB + n * r_sn + bias_row * r_sh + t_col[None, :] - t_col[:, None] + KW - 1
    return _logits(q, k, bias_ptrs, in_group, scale_log2, HAS_RPB, PRECISION)


@triton.jit
def na2d_whole_forward_kernel(
    Q, K, V, RPB, OUT, LSE,
    q_sb, q_sh, q_sw, q_sn,
    k_sb, k_sh, k_sw, k_sn,
    v_sb, v_sh, v_sw, v_sn,
    o_sb, o_sh, o_sw, o_sn,
    r_sn, r_sh,
    heads, height, width, head_dim, dil_h, dil_w, scale_log2,
    KH: tl.constexpr, KW: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Output and base-2 log-sum-exp of one (image, head, dilation group): program ids 0 and 1."""
    pid_bn, group = tl.program_id(0), tl.program_id(1)
    b, n = (pid_bn // heads).to(tl.int64), pid_bn % heads
    t, valid, t_row, t_col = _group_places(KH, KW, BLOCK)
    rows, cols = _group_tokens(group, t_row, t_col, dil_h, dil_w)
    d = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (d < head_dim)[None, :]
    q = tl.load(_tokens(Q, b, rows, n, cols, d, q_sb, q_sh, q_sw, q_sn), mask=mask, other=0.0)
    k = tl.load(_tokens(K, b, rows, n, cols, d, k_sb, k_sh, k_sw, k_sn), mask=mask, other=0.0)
    v = tl.load(_tokens(V, b, rows, n, cols, d, v_sb, v_sh, v_sw, v_sn), mask=mask, other=0.0)
    s = _whole_logits(q, k, RPB, n, r_sn, r_sh, t_row, t_col, valid, scale_log2, KH, KW, HAS_RPB, PRECISION)
    m = tl.where(valid, tl.max(s, 1), 0.0)  # padding rows have no key: kept finite
    p = tl.exp2(s - m[:, None])
    l_sum = tl.where(valid, tl.sum(p, 1), 1.0)
    out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / l_sum[:, None]
    tl.store(_tokens(OUT, b, rows, n, cols, d, o_sb, o_sh, o_sw, o_sn), out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(LSE + _statistic(b, rows, cols, n, height, width, heads), m + tl.log2(l_sum), mask=valid)


@triton.jit
def na2d_whole_backward_kernel(
    Q, K, V, RPB, DO, OUT, LSE, DQ, DK, DV, DRPB,
    q_sb, q_sh, q_sw, q_sn,
    k_sb, k_sh, k_sw, k_sn,
    v_sb, v_sh, v_sw, v_sn,
    do_sb, do_sh, do_sw, do_sn,
    o_sb, o_sh, o_sw, o_sn,
    g_sb, g_sh, g_sw, g_sn,
    r_sn, r_sh,
    batch, heads, height, width, head_dim, dil_h, dil_w, scale_log2, scale,
    KH: tl.constexpr, KW: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq, dk, dv (strides g_*) of every (image, dilation group) of head program_id(1) that program
    p = program_id(0) of P = num_programs(0) owns (p, p + P, ...), and with rpb its sum of the
    logits' gradients over them: DRPB is (heads, P, kh*kw, kh*kw), query-major; the caller sums the
    programs and maps (query, key) pairs to rpb entries (deterministic, no atomics)."""
    program, n, programs = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    t, valid, t_row, t_col = _group_places(KH, KW, BLOCK)
    d = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (d < head_dim)[None, :]
    ds_sum = tl.zeros([BLOCK, BLOCK], tl.float32)
    groups = dil_h * dil_w
    for item in range(program, batch * groups, programs):
        b, group = (item // groups).to(tl.int64), item % groups
        rows, cols = _group_tokens(group, t_row, t_col, dil_h, dil_w)
        q = tl.load(_tokens(Q, b, rows, n, cols, d, q_sb, q_sh, q_sw, q_sn), mask=mask, other=0.0)
        k = tl.load(_tokens(K, b, rows, n, cols, d, k_sb, k_sh, k_sw, k_sn), mask=mask, other=0.0)
        v = tl.load(_tokens(V, b, rows, n, cols, d, v_sb, v_sh, v_sw, v_sn), mask=mask, other=0.0)
        do = tl.load(_tokens(DO, b, rows, n, cols, d, do_sb, do_sh, do_sw, do_sn), mask=mask, other=0.0)
        out = tl.load(_tokens(OUT, b, rows, n, cols, d, o_sb, o_sh, o_sw, o_sn), mask=mask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
        lse = tl.load(LSE + _statistic(b, rows, cols, n, height, width, heads), mask=valid, other=0.0)
        s = _whole_logits(q, k, RPB, n, r_sn, r_sh, t_row, t_col, valid, scale_log2, KH, KW, HAS_RPB, PRECISION)
        p = tl.exp2(s - lse[:, None])
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # gradient of the logits
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        if HAS_RPB:
            ds_sum += ds
        dq_ptrs = _tokens(DQ, b, rows, n, cols, d, g_sb, g_sh, g_sw, g_sn)
        dk_ptrs = _tokens(DK, b, rows, n, cols, d, g_sb, g_sh, g_sw, g_sn)
        dv_ptrs = _tokens(DV, b, rows, n, cols, d, g_sb, g_sh, g_sw, g_sn)
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=mask)
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)
    if HAS_RPB:
        pairs = DRPB + ((n * programs + program).to(tl.int64) * (KH * KW) + t[:, None]) * (KH * KW) + t[None, :]
        tl.store(pairs, ds_sum, mask=valid[:, None] & valid[None, :])


# --------------------------------------------------------------------------------------------
# The unfused ops' three primitives, on (N, H, W, D) features and (N, H, W, kh*kw) weights, all
# contiguous (N = batch * heads). They are closed under differentiation (see primitives.py).


@triton.jit
def _neighbor_ptrs(base, n, key_row, key_cols, d, height, width, head_dim):
    """Pointers (queries, kw, D) to the features d of each query's kw keys in ``key_row``."""
    return base + ((n * height + key_row) * width + key_cols[:, :, None]) * head_dim + d[None, None, :]


@triton.jit
def _neighbor_tile(pid_col, row, n, height, width, dil_h, dil_w, BLOCK_M: tl.constexpr, KW_PAD: tl.constexpr,
                   KH: tl.constexpr, KW: tl.constexpr):  # fmt: skip
    """A primitive's program: BLOCK_M queries of one row and column group, each with its kw keys.

    Returns (token index of each query, query valid, j = 0..KW_PAD-1, (query, j) valid, key column of
    each (query, j), row group, first key row place of the window).
    """
    cols, _, valid, start, _, _, _, _, _ = _query_tile(
        pid_col, width, dil_w, tl.arange(0, BLOCK_M), BLOCK_M, BLOCK_M, KW
    )
    j = tl.arange(0, KW_PAD)
    key_cols = pid_col % dil_w + dil_w * (start[:, None] + j[None, :])
    row_group, row_start, _ = _attended_rows(row, height, dil_h, 1, KH)
    tokens = (n * height + row) * width + cols
    return tokens, valid, j, valid[:, None] & (j < KW)[None, :], key_cols, row_group, row_start


@triton.jit
def na_dot_kernel(
    A, B, OUT, height, width, head_dim, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, KW_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """OUT[query, i*kw + j] = A[query] . B[its key (i, j)]."""
    n, row = tl.program_id(0).to(tl.int64), tl.program_id(1)
    tokens, valid, j, pair_ok, key_cols, row_group, row_start = _neighbor_tile(
        tl.program_id(2), row, n, height, width, dil_h, dil_w, BLOCK_M, KW_PAD, KH, KW
    )
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    a = tl.load(A + tokens[:, None] * head_dim + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
    for i in range(KH):
        key_row = row_group + dil_h * (row_start + i)
        b = tl.load(_neighbor_ptrs(B, n, key_row, key_cols, d, height, width, head_dim),
                    mask=pair_ok[:, :, None] & d_ok[None, None, :], other=0.0)  # fmt: skip
        dots = tl.sum(a[:, None, :].to(tl.float32) * b.to(tl.float32), 2)
        out = OUT + tokens[:, None] * (KH * KW) + i * KW + j[None, :]
        tl.store(out, dots.to(OUT.dtype.element_ty), mask=pair_ok)


@triton.jit
def na_weighted_sum_kernel(
    P, B, OUT, height, width, head_dim, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, KW_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """OUT[query] = sum over its keys (i, j) of P[query, i*kw + j] * B[key]."""
    n, row = tl.program_id(0).to(tl.int64), tl.program_id(1)
    tokens, valid, j, pair_ok, key_cols, row_group, row_start = _neighbor_tile(
        tl.program_id(2), row, n, height, width, dil_h, dil_w, BLOCK_M, KW_PAD, KH, KW
    )
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i in range(KH):
        key_row = row_group + dil_h * (row_start + i)
        p = tl.load(P + tokens[:, None] * (KH * KW) + i * KW + j[None, :], mask=pair_ok, other=0.0)
        b = tl.load(_neighbor_ptrs(B, n, key_row, key_cols, d, height, width, head_dim),
                    mask=pair_ok[:, :, None] & d_ok[None, None, :], other=0.0)  # fmt: skip
        acc += tl.sum(p[:, :, None].to(tl.float32) * b.to(tl.float32), 1)
    out = OUT + tokens[:, None] * head_dim + d[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=valid[:, None] & d_ok[None, :])


@triton.jit
def na_scatter_kernel(
    P, A, OUT, height, width, head_dim, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """OUT[key] = sum over the (query, i*kw + j) pairs that see this key of P[query, i*kw + j] * A[query].

    One program per BLOCK_N key places of one row and column group, as na2d_backward_key_kernel.
    """
    n, key_row, pid_col = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    group, group_len, key_place, key_valid, query_lo, query_hi = _key_columns(
        pid_col, width, dil_w, tl.arange(0, BLOCK_N), BLOCK_N, KW
    )
    row_group, rows_len, row_lo, row_hi = _reaching_rows(key_row, height, dil_h, 1, KH)
    key_row_place = key_row // dil_h

    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    tiles = (query_hi - query_lo) // BLOCK_M + 1  # query tiles per row (see _key_columns)
    for step in range((row_hi - row_lo + 1) * tiles):  # one loop, which Triton pipelines
        query_row_place = row_lo + step // tiles
        place = query_lo + (step % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = place <= query_hi
        rel = key_place[:, None] - _window_start(place, group_len, KW)[None, :]
        in_window = (rel >= 0) & (rel < KW) & valid[None, :] & key_valid[:, None]
        row = row_group + dil_h * query_row_place
        i = key_row_place - _window_start(query_row_place, rows_len, KH)  # this key row's index in the window
        tokens = (n * height + row) * width + group + dil_w * place
        p = tl.load(P + tokens[None, :] * (KH * KW) + i * KW + rel, mask=in_window, other=0.0)  # keys x queries
        a = tl.load(A + tokens[:, None] * head_dim + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(p.to(a.dtype), a, input_precision=PRECISION)
    out = OUT + ((n * height + key_row) * width + group + dil_w * key_place[:, None]) * head_dim + d[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=key_valid[:, None] & d_ok[None, :])
