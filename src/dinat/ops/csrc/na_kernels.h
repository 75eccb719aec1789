/* Kernel bodies, included by na_cpu.c once per element type T with name suffix SUFFIX.
 * Vectors are GCC/Clang vector extensions of VL lanes (one lane per query of a chunk). */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(x) CAT(x, SUFFIX)
#define VEC NAME(vec)
#define UVEC NAME(uvec)

typedef T VEC __attribute__((vector_size(VL * sizeof(T))));
typedef T UVEC __attribute__((vector_size(VL * sizeof(T)), aligned(sizeof(T)))); /* unaligned access */

#define GEOMETRY_ARGS                                                                              \
    int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t dh, int64_t dw,    \
        const int64_t *rowstart, const int64_t *colstart, int nthreads

/* Scratch for `count` vectors, aligned as the vector type requires (malloc only guarantees 16). */
static inline VEC *NAME(alloc_vectors)(int64_t count) {
    return aligned_alloc(64, ((sizeof(VEC) * (size_t)count + 63) / 64) * 64);
}

/* A full vector from src. The caller guarantees VL readable elements past the end of every
 * operand (see cpu.py), so a chunk near the end of a row may read past it: those lanes are never
 * stored. */
static inline VEC NAME(load)(const T *src) { return *(const UVEC *)src; }

/* Lanes [0, len) of v to dst. */
static inline void NAME(store)(T *dst, VEC v, int64_t len) {
    if (len == VL) {
        *(UVEC *)dst = v;
        return;
    }
    for (int64_t u = 0; u < len; u++) dst[u] = v[u];
}

/* exp of every lane, for lanes <= 0 (logits minus their maximum). float: Cephes' expf polynomial
 * (about 1 ulp) with the power of two built in the exponent bits; double: libm per lane. */
static inline VEC NAME(exp_nonpositive)(VEC x) {
#if IS_FLOAT
    typedef int32_t ivec __attribute__((vector_size(VL * sizeof(int32_t))));
    for (int64_t u = 0; u < VL; u++) x[u] = x[u] < -87.0f ? -87.0f : x[u];
    const VEC n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    const VEC r = x - n * 0.693359375f + n * 2.12194440e-4f;
    VEC p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    return p * (VEC)bits;
#else
    for (int64_t u = 0; u < VL; u++) x[u] = exp(x[u]);
    return x;
#endif
}

/* The dot products of a chunk of queries (pre-scaled, q[c]) with all kh*kw neighbors: logit[ab]. */
static inline void NAME(chunk_dots)(const VEC *q, const T *Bn, const chunk_t *ch, int64_t C, int64_t HW,
                                    int64_t W, int64_t row0, int64_t kh, int64_t kw, int64_t dh, int64_t dw,
                                    int64_t col0, VEC *logit) {
    for (int64_t a = 0; a < kh; a++) {
        const T *rowk = Bn + (row0 + a * dh) * W + col0;
        for (int64_t b0 = 0; b0 < kw; b0 += NEIGHBOR_BLOCK) {
            int64_t offset[NEIGHBOR_BLOCK]; /* past kw, repeat the last neighbor (not kept) */
            for (int64_t x = 0; x < NEIGHBOR_BLOCK; x++) offset[x] = (b0 + x < kw ? b0 + x : kw - 1) * dw;
            VEC acc[NEIGHBOR_BLOCK] = {{0}};
            if (ch->shift) {
                for (int64_t c = 0; c < C; c++)
                    for (int64_t x = 0; x < NEIGHBOR_BLOCK; x++) acc[x] += q[c] * NAME(load)(rowk + c * HW + offset[x]);
            } else {
                for (int64_t c = 0; c < C; c++)
                    for (int64_t x = 0; x < NEIGHBOR_BLOCK; x++) acc[x] += q[c] * rowk[c * HW + offset[x]];
            }
            for (int64_t x = 0; x < NEIGHBOR_BLOCK && b0 + x < kw; x++) logit[a * kw + b0 + x] = acc[x];
        }
    }
}

typedef struct {
    const T *rpb;                   /* SOFTMAX: (heads, 2kh-1, 2kw-1) or NULL */
    int64_t heads;                  /* SOFTMAX: head of slab n is n % heads */
    double scale;                   /* SOFTMAX: multiplies the dot products */
    const int64_t *rowoff, *coloff; /* SOFTMAX: rpb row / column of neighbor 0 of each query row / column */
    const T *P;                     /* SOFTMAX_BACKWARD: the attention (weights layout) */
} NAME(epilogue_t);

/* out[n,i,ab,j] = f(sum_c A[n,c,i,j] * B[n,c,nbr(i,j,ab)]) with f chosen by mode:
 *   STORE_DOTS:       the dot products themselves;
 *   SOFTMAX:          softmax over ab of scale * dots + rpb[n % heads, row, col];
 *   SOFTMAX_BACKWARD: P * (dots - sum_ab P * dots), the logits' gradient when A is the output's
 *                     gradient and B is v. */
static void NAME(dot_kernel)(const T *A, const T *B, T *out, int mode, const NAME(epilogue_t) * ep, GEOMETRY_ARGS) {
    const int64_t HW = H * W, KK = kh * kw, RW = 2 * kw - 1, RS = (2 * kh - 1) * RW;
    const T scale = mode == SOFTMAX ? (T)ep->scale : (T)1;
    chunk_t *chunks = malloc(sizeof(chunk_t) * (size_t)W);
    const int64_t nchunks = make_chunks(colstart, W, chunks);
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t i = 0; i < H; i++) {
            VEC *q = NAME(alloc_vectors)(C);
            VEC *dots = NAME(alloc_vectors)(KK);
            const T *rpb_h = mode == SOFTMAX && ep->rpb ? ep->rpb + (n % ep->heads) * RS : NULL;
            for (int64_t s = 0; s < nchunks; s++) {
                const chunk_t *ch = &chunks[s];
                for (int64_t c = 0; c < C; c++) q[c] = NAME(load)(A + (n * C + c) * HW + i * W + ch->j0) * scale;
                NAME(chunk_dots)(q, B + n * C * HW, ch, C, HW, W, rowstart[i], kh, kw, dh, dw, colstart[ch->j0], dots);
                T *o = out + (n * H + i) * KK * W + ch->j0;
                if (mode == SOFTMAX) {
                    if (rpb_h && ch->shift) { /* the queries' keys all sit at the same offsets: one bias each */
                        const T *bias = rpb_h + ep->rowoff[i] * RW + ep->coloff[ch->j0];
                        for (int64_t a = 0; a < kh; a++)
                            for (int64_t b = 0; b < kw; b++) dots[a * kw + b] += bias[a * RW + b];
                    } else if (rpb_h) {
                        for (int64_t a = 0; a < kh; a++)
                            for (int64_t b = 0; b < kw; b++)
                                for (int64_t u = 0; u < VL; u++)
                                    dots[a * kw + b][u] +=
                                        rpb_h[(ep->rowoff[i] + a) * RW + ep->coloff[ch->j0 + (u < ch->len ? u : 0)] + b];
                    }
                    VEC top = dots[0];
                    for (int64_t ab = 1; ab < KK; ab++)
                        for (int64_t u = 0; u < VL; u++) top[u] = dots[ab][u] > top[u] ? dots[ab][u] : top[u];
                    VEC total = {0};
                    for (int64_t ab = 0; ab < KK; ab++) {
                        dots[ab] = NAME(exp_nonpositive)(dots[ab] - top);
                        total += dots[ab];
                    }
                    const VEC inverse = 1 / total;
                    for (int64_t ab = 0; ab < KK; ab++) dots[ab] *= inverse;
                } else if (mode == SOFTMAX_BACKWARD) {
                    const T *p = ep->P + (n * H + i) * KK * W + ch->j0;
                    VEC total = {0};
                    for (int64_t ab = 0; ab < KK; ab++) total += NAME(load)(p + ab * W) * dots[ab];
                    for (int64_t ab = 0; ab < KK; ab++) dots[ab] = NAME(load)(p + ab * W) * (dots[ab] - total);
                }
                for (int64_t ab = 0; ab < KK; ab++) NAME(store)(o + ab * W, dots[ab], ch->len);
            }
            free(dots);
            free(q);
        }
    }
    free(chunks);
}

void NAME(na_dot)(const T *A, const T *B, T *out, GEOMETRY_ARGS) {
    NAME(dot_kernel)(A, B, out, STORE_DOTS, NULL, N, C, H, W, kh, kw, dh, dw, rowstart, colstart, nthreads);
}

/* Fused logits and softmax; see dot_kernel's SOFTMAX. rpb may be NULL. */
void NAME(na_attend)(const T *A, const T *B, const T *rpb, int64_t heads, double scale, const int64_t *rowoff,
                     const int64_t *coloff, T *out, GEOMETRY_ARGS) {
    const NAME(epilogue_t) ep = {rpb, heads, scale, rowoff, coloff, NULL};
    NAME(dot_kernel)(A, B, out, SOFTMAX, &ep, N, C, H, W, kh, kw, dh, dw, rowstart, colstart, nthreads);
}

/* The logits' gradient of softmax-then-weighted-sum; see dot_kernel's SOFTMAX_BACKWARD. */
void NAME(na_attend_backward)(const T *A, const T *B, const T *P, T *out, GEOMETRY_ARGS) {
    const NAME(epilogue_t) ep = {NULL, 1, 1.0, NULL, NULL, P};
    NAME(dot_kernel)(A, B, out, SOFTMAX_BACKWARD, &ep, N, C, H, W, kh, kw, dh, dw, rowstart, colstart, nthreads);
}

void NAME(na_weighted_sum)(const T *P, const T *B, T *out, GEOMETRY_ARGS) {
    const int64_t HW = H * W, KK = kh * kw;
    chunk_t *chunks = malloc(sizeof(chunk_t) * (size_t)W);
    const int64_t nchunks = make_chunks(colstart, W, chunks);
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t i = 0; i < H; i++) {
            VEC *p = NAME(alloc_vectors)(KK);
            const T *Pi = P + (n * H + i) * KK * W;
            for (int64_t s = 0; s < nchunks; s++) {
                const chunk_t *ch = &chunks[s];
                for (int64_t ab = 0; ab < KK; ab++) p[ab] = NAME(load)(Pi + ab * W + ch->j0);
                for (int64_t c0 = 0; c0 < C; c0 += CHANNEL_BLOCK) {
                    int64_t plane[CHANNEL_BLOCK]; /* past C, repeat the last channel (not stored) */
                    for (int64_t x = 0; x < CHANNEL_BLOCK; x++) plane[x] = (c0 + x < C ? c0 + x : C - 1) * HW;
                    VEC acc[CHANNEL_BLOCK] = {{0}};
                    for (int64_t a = 0; a < kh; a++) {
                        const T *rowv = B + n * C * HW + (rowstart[i] + a * dh) * W + colstart[ch->j0];
                        const VEC *pa = p + a * kw;
                        if (ch->shift) {
                            for (int64_t b = 0; b < kw; b++)
                                for (int64_t x = 0; x < CHANNEL_BLOCK; x++)
                                    acc[x] += pa[b] * NAME(load)(rowv + plane[x] + b * dw);
                        } else {
                            for (int64_t b = 0; b < kw; b++)
                                for (int64_t x = 0; x < CHANNEL_BLOCK; x++) acc[x] += pa[b] * rowv[plane[x] + b * dw];
                        }
                    }
                    for (int64_t x = 0; x < CHANNEL_BLOCK && c0 + x < C; x++)
                        NAME(store)(out + (n * C + c0 + x) * HW + i * W + ch->j0, acc[x], ch->len);
                }
            }
            free(p);
        }
    }
    free(chunks);
}

/* out must be zero-filled by the caller. Each n is owned by one thread.
 *
 * Queries whose neighborhood is not clamped ("regular": colstart[j] == j - r*dw) are summed as a
 * gather over keys: key k receives neighbor b of query k + (r - b)*dw, read from zero-padded row
 * copies, so a chunk of keys accumulates in registers and is written once. The few clamped border
 * queries are then scattered with read-modify-writes, one query row sweep per neighbor so that
 * consecutive writes never overlap (overlap would stall store-to-load forwarding). */
void NAME(na_scatter)(const T *P, const T *A, T *out, GEOMETRY_ARGS) {
    const int64_t HW = H * W, KK = kh * kw, CB = (C + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK;
    const int64_t R = (kw / 2) * dw, WP = W + 2 * R + VL; /* padded row: R zeros, W, R + VL zeros */
    const int64_t PTW = KK + VL;                          /* a border query's weights, plus slack */
    chunk_t *chunks = malloc(sizeof(chunk_t) * (size_t)W);
    const int64_t nchunks = make_chunks(colstart, W, chunks);
    char *regular = malloc((size_t)W);
    char *clamped_chunk = calloc((size_t)nchunks, 1);
    for (int64_t j = 0; j < W; j++) regular[j] = colstart[j] == j - R;
    for (int64_t s = 0; s < nchunks; s++)
        for (int64_t u = chunks[s].first; u < chunks[s].len; u++)
            if (!regular[chunks[s].j0 + u]) clamped_chunk[s] = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        T *apad = calloc((size_t)(CHANNEL_BLOCK * WP), sizeof(T));
        T *ppad = calloc((size_t)(KK * WP), sizeof(T));
        VEC *val = NAME(alloc_vectors)(nchunks * CHANNEL_BLOCK);
        T *pt = calloc((size_t)(nchunks * VL * PTW), sizeof(T)); /* border weights, query-major */
        for (int64_t i = 0; i < H; i++) {
            const T *Pi = P + (n * H + i) * KK * W;
            for (int64_t s = 0; s < nchunks; s++)
                if (clamped_chunk[s] && !chunks[s].shift)
                    for (int64_t u = 0; u < chunks[s].len; u++)
                        for (int64_t ab = 0; ab < KK; ab++) pt[(s * VL + u) * PTW + ab] = Pi[ab * W + chunks[s].j0 + u];
            for (int64_t ab = 0; ab < KK; ab++) memcpy(ppad + ab * WP + R, Pi + ab * W, sizeof(T) * (size_t)W);
            for (int64_t cb = 0; cb < CB; cb++) {
                const int64_t c0 = cb * CHANNEL_BLOCK, nc = C - c0 < CHANNEL_BLOCK ? C - c0 : CHANNEL_BLOCK;
                for (int64_t x = 0; x < nc; x++) {
                    const T *Ai = A + (n * C + c0 + x) * HW + i * W;
                    for (int64_t j = 0; j < W; j++) apad[x * WP + R + j] = regular[j] ? Ai[j] : (T)0;
                    for (int64_t s = 0; s < nchunks; s++) {
                        if (!clamped_chunk[s]) continue;
                        VEC v = NAME(load)(Ai + chunks[s].j0);
                        for (int64_t u = 0; u < VL; u++)
                            if (u < chunks[s].first || u >= chunks[s].len || regular[chunks[s].j0 + u]) v[u] = 0;
                        val[s * CHANNEL_BLOCK + x] = v;
                    }
                }
                for (int64_t a = 0; a < kh; a++) {
                    T *rowo = out + (n * C + c0) * HW + (rowstart[i] + a * dh) * W;
                    for (int64_t k0 = 0; k0 < W; k0 += VL) {
                        VEC acc[CHANNEL_BLOCK] = {{0}};
                        for (int64_t b = 0; b < kw; b++) {
                            const int64_t from = R + k0 + (kw / 2 - b) * dw;
                            const VEC w = NAME(load)(ppad + (a * kw + b) * WP + from);
                            for (int64_t x = 0; x < CHANNEL_BLOCK; x++) acc[x] += w * NAME(load)(apad + x * WP + from);
                        }
                        const int64_t len = W - k0 < VL ? W - k0 : VL;
                        for (int64_t x = 0; x < nc; x++) {
                            T *o = rowo + x * HW + k0;
                            if (len == VL) {
                                *(UVEC *)o += acc[x];
                            } else {
                                for (int64_t u = 0; u < len; u++) o[u] += acc[x][u];
                            }
                        }
                    }
                    for (int64_t s = 0; s < nchunks; s++) {
                        if (!clamped_chunk[s]) continue;
                        const chunk_t *ch = &chunks[s];
                        T *o = rowo + colstart[ch->j0];
                        if (ch->shift) { /* lanes of different keys: one read-modify-write per lane */
                            for (int64_t b = 0; b < kw; b++) {
                                const VEC w = NAME(load)(Pi + (a * kw + b) * W + ch->j0);
                                for (int64_t x = 0; x < nc; x++) {
                                    const VEC contrib = w * val[s * CHANNEL_BLOCK + x];
                                    for (int64_t u = 0; u < ch->len; u++) o[x * HW + b * dw + u] += contrib[u];
                                }
                            }
                            continue;
                        }
                        /* All lanes share their keys: vectorise over the neighbors b instead. */
                        const T *pts = pt + s * VL * PTW;
                        for (int64_t b0 = 0; b0 < kw; b0 += VL) {
                            for (int64_t x = 0; x < nc; x++) {
                                VEC acc = {0};
                                for (int64_t u = 0; u < ch->len; u++)
                                    acc += NAME(load)(pts + u * PTW + a * kw + b0) * val[s * CHANNEL_BLOCK + x][u];
                                if (dw == 1 && colstart[ch->j0] + b0 + VL <= W) {
                                    /* contiguous keys, all lanes inside the row: one vector update,
                                     * lanes past kw add 0 (past the row, they would touch memory
                                     * another thread may be updating: the next n's slab) */
                                    for (int64_t e = 0; e < VL; e++) acc[e] = b0 + e < kw ? acc[e] : (T)0;
                                    *(UVEC *)(o + x * HW + b0) += acc;
                                } else {
                                    for (int64_t e = 0; e < VL && b0 + e < kw; e++) o[x * HW + (b0 + e) * dw] += acc[e];
                                }
                            }
                        }
                    }
                }
            }
        }
        free(pt);
        free(val);
        free(ppad);
        free(apad);
    }
    free(clamped_chunk);
    free(regular);
    free(chunks);
}

#undef GEOMETRY_ARGS
#undef UVEC
#undef VEC
#undef NAME
#undef CAT
#undef CAT_
