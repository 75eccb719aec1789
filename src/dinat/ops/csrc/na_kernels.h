/* Kernel bodies, included by na_cpu.c once per element type T with name suffix SUFFIX.
 * Vectors are GCC/Clang vector extensions of VL lanes (one lane per query of a chunk; per key
 * in the key gradient). */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(x) CAT(x, SUFFIX)
#define VEC NAME(vec)
#define UVEC NAME(uvec)
#define IVEC NAME(ivec)

typedef T VEC __attribute__((vector_size(VL * sizeof(T))));
typedef T UVEC __attribute__((vector_size(VL * sizeof(T)), aligned(sizeof(T)))); /* unaligned access */
typedef ITYPE IVEC __attribute__((vector_size(VL * sizeof(T))));                  /* lane indices */

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

/* Lane u of the result is lane idx[u] of v. */
static inline VEC NAME(permute)(VEC v, IVEC idx) {
#if defined(__GNUC__) && !defined(__clang__)
    return __builtin_shuffle(v, idx);
#else
    VEC out;
    for (int64_t u = 0; u < VL; u++) out[u] = v[idx[u]];
    return out;
#endif
}

/* The chunk's lane indices (see chunk_t) as a vector. */
static inline IVEC NAME(lane_indices)(const chunk_t *ch) {
    IVEC idx;
    for (int64_t u = 0; u < VL; u++) idx[u] = (ITYPE)ch->idx[u];
    return idx;
}

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
                                    VEC *logit) {
    const IVEC idx = NAME(lane_indices)(ch);
    for (int64_t a = 0; a < kh; a++) {
        const T *rowk = Bn + (row0 + a * dh) * W + ch->base;
        for (int64_t b0 = 0; b0 < kw; b0 += NEIGHBOR_BLOCK) {
            int64_t offset[NEIGHBOR_BLOCK]; /* past kw, repeat the last neighbor (not kept) */
            for (int64_t x = 0; x < NEIGHBOR_BLOCK; x++) offset[x] = (b0 + x < kw ? b0 + x : kw - 1) * dw;
            VEC acc[NEIGHBOR_BLOCK] = {{0}};
            if (ch->kind == SHIFT) {
                for (int64_t c = 0; c < C; c++)
                    for (int64_t x = 0; x < NEIGHBOR_BLOCK; x++) acc[x] += q[c] * NAME(load)(rowk + c * HW + offset[x]);
            } else if (ch->kind == SHARED) {
                for (int64_t c = 0; c < C; c++)
                    for (int64_t x = 0; x < NEIGHBOR_BLOCK; x++) acc[x] += q[c] * rowk[c * HW + offset[x]];
            } else {
                for (int64_t c = 0; c < C; c++)
                    for (int64_t x = 0; x < NEIGHBOR_BLOCK; x++)
                        acc[x] += q[c] * NAME(permute)(NAME(load)(rowk + c * HW + offset[x]), idx);
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
                NAME(chunk_dots)(q, B + n * C * HW, ch, C, HW, W, rowstart[i], kh, kw, dh, dw, dots);
                T *o = out + (n * H + i) * KK * W + ch->j0;
                if (mode == SOFTMAX) {
                    if (rpb_h && ch->kind == SHIFT) { /* the keys all sit at the same offsets: one bias each */
                        const T *bias = rpb_h + ep->rowoff[i] * RW + ep->coloff[ch->j0];
                        for (int64_t a = 0; a < kh; a++)
                            for (int64_t b = 0; b < kw; b++) dots[a * kw + b] += bias[a * RW + b];
                    } else if (rpb_h) { /* one load per neighbor, permuted, where the lanes' biases are near */
                        int64_t lo = ep->coloff[ch->j0], hi = lo;
                        IVEC bidx;
                        for (int64_t u = 1; u < ch->len; u++) {
                            lo = ep->coloff[ch->j0 + u] < lo ? ep->coloff[ch->j0 + u] : lo;
                            hi = ep->coloff[ch->j0 + u] > hi ? ep->coloff[ch->j0 + u] : hi;
                        }
                        for (int64_t u = 0; u < VL; u++) bidx[u] = (ITYPE)(ep->coloff[ch->j0 + (u < ch->len ? u : 0)] - lo);
                        for (int64_t a = 0; a < kh; a++) {
                            const T *bias = rpb_h + (ep->rowoff[i] + a) * RW + lo;
                            for (int64_t b = 0; b < kw; b++)
                                if (hi - lo < VL) {
                                    dots[a * kw + b] += NAME(permute)(NAME(load)(bias + b), bidx);
                                } else {
                                    for (int64_t u = 0; u < VL; u++) dots[a * kw + b][u] += bias[b + bidx[u]];
                                }
                        }
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

/* dst[b, c, p] = src[b * sb + p * sp + c]: tokens-first features (channels contiguous, positions
 * one stride apart) to the kernels' channel-major layout, in 16 x 16 tiles (torch's strided copy
 * of the same permutation takes 2-2.5x as long). */
void NAME(na_to_channel_major)(const T *src, T *dst, int64_t B, int64_t P, int64_t C, int64_t sb, int64_t sp,
                               int nthreads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < B; b++)
        for (int64_t p0 = 0; p0 < P; p0 += 16) {
            const int64_t pn = P - p0 < 16 ? P - p0 : 16;
            for (int64_t c0 = 0; c0 < C; c0 += 16) {
                const int64_t cn = C - c0 < 16 ? C - c0 : 16;
                for (int64_t c = c0; c < c0 + cn; c++) {
                    const T *from = src + b * sb + p0 * sp + c;
                    T *to = dst + (b * C + c) * P + p0;
                    for (int64_t p = 0; p < pn; p++) to[p] = from[p * sp];
                }
            }
        }
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
                const IVEC idx = NAME(lane_indices)(ch);
                for (int64_t ab = 0; ab < KK; ab++) p[ab] = NAME(load)(Pi + ab * W + ch->j0);
                for (int64_t c0 = 0; c0 < C; c0 += CHANNEL_BLOCK) {
                    int64_t plane[CHANNEL_BLOCK]; /* past C, repeat the last channel (not stored) */
                    for (int64_t x = 0; x < CHANNEL_BLOCK; x++) plane[x] = (c0 + x < C ? c0 + x : C - 1) * HW;
                    VEC acc[CHANNEL_BLOCK] = {{0}};
                    for (int64_t a = 0; a < kh; a++) {
                        const T *rowv = B + n * C * HW + (rowstart[i] + a * dh) * W + ch->base;
                        const VEC *pa = p + a * kw;
                        if (ch->kind == SHIFT) {
                            for (int64_t b = 0; b < kw; b++)
                                for (int64_t x = 0; x < CHANNEL_BLOCK; x++)
                                    acc[x] += pa[b] * NAME(load)(rowv + plane[x] + b * dw);
                        } else if (ch->kind == SHARED) {
                            for (int64_t b = 0; b < kw; b++)
                                for (int64_t x = 0; x < CHANNEL_BLOCK; x++) acc[x] += pa[b] * rowv[plane[x] + b * dw];
                        } else {
                            for (int64_t b = 0; b < kw; b++)
                                for (int64_t x = 0; x < CHANNEL_BLOCK; x++)
                                    acc[x] += pa[b] * NAME(permute)(NAME(load)(rowv + plane[x] + b * dw), idx);
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

/* The keys' gradient (dk from dS and q, dv from P and dO), key row by key row: each output element
 * is written once, by the thread that owns its n (out needs no zero fill).
 *
 * Columns are regrouped by dilation group, column j at position pos(j) = (j % dw) * S + j / dw with
 * at least r = kw/2 zeros between groups, so that every neighborhood is undilated. Queries whose
 * window is not clamped ("regular") are summed as a gather over keys: key position p receives
 * neighbor b of the query at p + r - b, read from zero-padded copies of the slab's rows (clamped
 * queries zeroed), so a chunk of keys accumulates in registers over every query row that sees its
 * key row. Clamped queries come in groups sharing one window (the first or last of their dilation
 * group): a group's contribution to its kw keys is summed with the neighbors b in the vector lanes
 * and added to the key row once. */
void NAME(na_scatter)(const T *P, const T *A, T *out, GEOMETRY_ARGS) {
    const int64_t HW = H * W, KK = kh * kw, r = kw / 2;
    const int64_t S = (W + dw - 1) / dw + r;                 /* a dilation group and the zeros after it */
    const int64_t NV = ((dw - 1) * S + (W - 1) / dw + VL) / VL; /* vectors that cover every key */
    const int64_t WP = NV * VL + 2 * r;                     /* padded row: r zeros, keys, r zeros */
    const int64_t RV = NV + 1;                              /* vectors per key row buffer (slack) */
    /* a clamped query's weights, rows padded with zeros to whole vectors: lanes past kw add 0 */
    const int64_t KWP = (kw + VL - 1) / VL * VL, PTW = kh * KWP;
    const int64_t CP = (C + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK * CHANNEL_BLOCK;
    int64_t *pos = malloc(sizeof(int64_t) * (size_t)W);
    for (int64_t j = 0; j < W; j++) pos[j] = (j % dw) * S + j / dw;
    /* clamped queries sorted by window start; group g is members[gfirst[g] .. gfirst[g + 1]) */
    int64_t *members = malloc(sizeof(int64_t) * (size_t)W), *gfirst = malloc(sizeof(int64_t) * (size_t)(W + 1));
    int64_t nclamped = 0, ngroups = 0;
    for (int64_t start = 0; start < W; start++) {
        const int64_t before = nclamped;
        for (int64_t j = 0; j < W; j++)
            if (colstart[j] != j - r * dw && colstart[j] == start) members[nclamped++] = j;
        if (nclamped > before) gfirst[ngroups++] = before;
    }
    gfirst[ngroups] = nclamped;
    /* the (query row, neighbor row) pairs that see key row i: pairs[pfirst[i] .. pfirst[i + 1]) */
    int64_t *pairs = malloc(sizeof(int64_t) * (size_t)(H * kh)), *pfirst = malloc(sizeof(int64_t) * (size_t)(H + 1));
    int64_t npairs = 0;
    for (int64_t i = 0; i < H; i++) {
        pfirst[i] = npairs;
        for (int64_t q = 0; q < H; q++)
            for (int64_t a = 0; a < kh; a++)
                if (rowstart[q] + a * dh == i) pairs[npairs++] = q * kh + a;
    }
    pfirst[H] = npairs;
#pragma omp parallel num_threads(nthreads)
    {
        T *ppad = calloc((size_t)(H * KK * WP), sizeof(T)); /* the slab's weights, padded rows */
        T *apad = calloc((size_t)(C * H * WP), sizeof(T));  /* its features, clamped queries zeroed */
        VEC *pt = NAME(alloc_vectors)(H * nclamped * PTW / VL + 1); /* clamped queries' weights */
        T *aval = calloc((size_t)(H * nclamped * CP + 1), sizeof(T)); /* their features, channels zero-padded to whole blocks */
        VEC *row = NAME(alloc_vectors)(CHANNEL_BLOCK * RV);          /* one key row, padded */
        memset(pt, 0, sizeof(T) * (size_t)(H * nclamped * PTW));
        T *const ptt = (T *)pt, *const rowt = (T *)row;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            for (int64_t q = 0; q < H; q++) {
                const T *Pq = P + (n * H + q) * KK * W;
                for (int64_t ab = 0; ab < KK; ab++) {
                    T *dst = ppad + (q * KK + ab) * WP;
                    if (dw == 1) memcpy(dst + r, Pq + ab * W, sizeof(T) * (size_t)W);
                    else for (int64_t j = 0; j < W; j++) dst[r + pos[j]] = Pq[ab * W + j];
                }
                for (int64_t t = 0; t < nclamped; t++)
                    for (int64_t a = 0; a < kh; a++)
                        for (int64_t b = 0; b < kw; b++)
                            ptt[(q * nclamped + t) * PTW + a * KWP + b] = Pq[(a * kw + b) * W + members[t]];
            }
            for (int64_t c = 0; c < C; c++)
                for (int64_t q = 0; q < H; q++) {
                    const T *Aq = A + (n * C + c) * HW + q * W;
                    T *dst = apad + (c * H + q) * WP;
                    if (dw == 1) memcpy(dst + r, Aq, sizeof(T) * (size_t)W);
                    else for (int64_t j = 0; j < W; j++) dst[r + pos[j]] = Aq[j];
                    for (int64_t t = 0; t < nclamped; t++) {
                        dst[r + pos[members[t]]] = 0;
                        aval[(q * nclamped + t) * CP + c] = Aq[members[t]];
                    }
                }
            for (int64_t i = 0; i < H; i++) {
                for (int64_t c0 = 0; c0 < C; c0 += CHANNEL_BLOCK) {
                    const int64_t nc = C - c0 < CHANNEL_BLOCK ? C - c0 : CHANNEL_BLOCK;
                    int64_t plane[CHANNEL_BLOCK]; /* past C, repeat the last channel (not stored) */
                    for (int64_t x = 0; x < CHANNEL_BLOCK; x++) plane[x] = (c0 + x < C ? c0 + x : C - 1) * H * WP;
                    for (int64_t v = 0; v < NV; v++) {
                        VEC acc[CHANNEL_BLOCK] = {{0}};
                        for (int64_t p = pfirst[i]; p < pfirst[i + 1]; p++) {
                            const int64_t q = pairs[p] / kh, a = pairs[p] % kh;
                            const T *pa = ppad + (q * KK + a * kw) * WP + v * VL + 2 * r;
                            const T *aq = apad + q * WP + v * VL + 2 * r;
                            for (int64_t b = 0; b < kw; b++) {
                                const VEC w = NAME(load)(pa + b * (WP - 1));
                                for (int64_t x = 0; x < CHANNEL_BLOCK; x++) acc[x] += w * NAME(load)(aq + plane[x] - b);
                            }
                        }
                        for (int64_t x = 0; x < CHANNEL_BLOCK; x++) row[x * RV + v] = acc[x];
                    }
                    for (int64_t g = 0; g < ngroups; g++) {
                        T *o = rowt + pos[colstart[members[gfirst[g]]]];
                        for (int64_t b0 = 0; b0 < kw; b0 += VL) {
                            VEC acc[CHANNEL_BLOCK] = {{0}};
                            for (int64_t p = pfirst[i]; p < pfirst[i + 1]; p++) {
                                const int64_t q = pairs[p] / kh, a = pairs[p] % kh;
                                for (int64_t t = gfirst[g]; t < gfirst[g + 1]; t++) {
                                    const VEC w = pt[((q * nclamped + t) * PTW + a * KWP + b0) / VL];
                                    const T *av = aval + (q * nclamped + t) * CP + c0;
                                    for (int64_t x = 0; x < CHANNEL_BLOCK; x++) acc[x] += w * av[x];
                                }
                            }
                            /* lanes past kw add 0, inside the row's padding */
                            for (int64_t x = 0; x < CHANNEL_BLOCK; x++) *(UVEC *)(o + x * RV * VL + b0) += acc[x];
                        }
                    }
                    for (int64_t x = 0; x < nc; x++) {
                        T *dst = out + (n * C + c0 + x) * HW + i * W;
                        const T *src = rowt + x * RV * VL;
                        if (dw == 1) memcpy(dst, src, sizeof(T) * (size_t)W);
                        else for (int64_t j = 0; j < W; j++) dst[j] = src[pos[j]];
                    }
                }
            }
        }
        free(row);
        free(aval);
        free(pt);
        free(apad);
        free(ppad);
    }
    free(pfirst);
    free(pairs);
    free(gfirst);
    free(members);
    free(pos);
}

#undef GEOMETRY_ARGS
#undef IVEC
#undef UVEC
#undef VEC
#undef NAME
#undef CAT
#undef CAT_
