/*
 * Vectorised CPU kernels of 2-D (dilated) neighborhood attention, loaded by dinat/ops/cpu.py.
 *
 * Why hand-written: neither PyTorch nor a maintained library has a CPU neighborhood-attention
 * kernel. Gathering each query's neighborhood materialises kh*kw copies of the keys, and BLAS over
 * query tiles spends most of its work on keys outside the neighborhood (BENCHMARKS.md).
 *
 * Layouts (contiguous, channel-major so that the queries of a row are contiguous):
 *   features (N, C, H, W)   q, k, v and their gradients; N = batch * heads
 *   weights  (N, H, KK, W)  logits / attention; KK = kh * kw neighbors, row-major
 * The neighborhood of query (i, j) is rows rowstart[i] + a*dh (a < kh) by columns
 * colstart[j] + b*dw (b < kw).
 *
 * Three primitives make the forward and backward passes of both unfused ops:
 *   dot:          out[n,i,ab,j]          = sum_c A[n,c,i,j] * B[n,c,nbr(i,j,ab)]    (q.k, dP = dO.v)
 *   weighted_sum: out[n,c,i,j]           = sum_ab P[n,i,ab,j] * B[n,c,nbr(i,j,ab)]  (P.v, dq = dS.k)
 *   scatter:      out[n,c,nbr(i,j,ab)]  += P[n,i,ab,j] * A[n,c,i,j]                (dk, dv)
 *
 * The body is written once (na_kernels.h) and compiled for float and double.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Queries per SIMD vector. 8 floats = one 256-bit register: on the AMD EPYC this project measures,
 * 512-bit operations cost two 256-bit ones, and the shorter vector wastes fewer lanes at borders. */
#define VL 8
/* Neighbors a dot-product pass accumulates together (kernel 7: two passes, one lane of the second
 * repeating the last neighbor), and channels a weighted-sum or key-gradient pass accumulates
 * together (each pass reloads the weights). Measured best at head dim 32, kernel 7. */
#define NEIGHBOR_BLOCK 4
#define CHANNEL_BLOCK 8

/* How the first keys of a chunk's queries lie: lane u's is base + u (SHIFT), base (SHARED), or
 * base + idx[u] with idx[u] < VL (MIXED: clamped borders, several dilation groups), so that one
 * vector load at base, permuted by idx, holds every lane's key. */
enum { SHIFT, SHARED, MIXED };

typedef struct {
    int64_t j0;  /* first query column of the chunk */
    int64_t len; /* queries in the chunk, 1..VL */
    int64_t base, kind, idx[VL];
} chunk_t;

/* max - min of colstart[j0 .. j0 + len), the lowest in *lo. */
static int64_t colstart_span(const int64_t *colstart, int64_t j0, int64_t len, int64_t *lo) {
    int64_t low = colstart[j0], high = colstart[j0];
    for (int64_t u = 1; u < len; u++) {
        low = colstart[j0 + u] < low ? colstart[j0 + u] : low;
        high = colstart[j0 + u] > high ? colstart[j0 + u] : high;
    }
    *lo = low;
    return high - low;
}

/* Cuts a row's queries into chunks of VL consecutive queries whose first keys lie within VL
 * columns (shorter where they do not); the last chunk of a row overlaps its predecessor rather
 * than being a partial one. Returns the chunk count. */
static int64_t make_chunks(const int64_t *colstart, int64_t W, chunk_t *chunks) {
    int64_t count = 0, lo;
    for (int64_t j = 0; j < W;) {
        int64_t j0 = j, len = W - j < VL ? W - j : VL;
        if (len < VL && W >= VL && colstart_span(colstart, W - VL, VL, &lo) < VL) { /* lanes before j recomputed */
            j0 = W - VL;
            len = VL;
        }
        while (colstart_span(colstart, j0, len, &lo) >= VL) len--;
        chunk_t ch = {j0, len, lo, SHIFT, {0}};
        int shift = 1, shared = 1;
        for (int64_t u = 0; u < len; u++) {
            ch.idx[u] = colstart[j0 + u] - lo;
            shift &= ch.idx[u] == u;
            shared &= ch.idx[u] == 0;
        }
        ch.kind = shift ? SHIFT : shared ? SHARED : MIXED;
        chunks[count++] = ch;
        j = j0 + len;
    }
    return count;
}

/* What the dot-product kernels do with a chunk's kh*kw dot products before storing them. */
enum { STORE_DOTS, SOFTMAX, SOFTMAX_BACKWARD };

#define T float
#define ITYPE int32_t
#define SUFFIX f32
#define IS_FLOAT 1
#include "na_kernels.h"
#undef IS_FLOAT
#undef ITYPE
#undef T
#undef SUFFIX

#define T double
#define ITYPE int64_t
#define SUFFIX f64
#define IS_FLOAT 0
#include "na_kernels.h"
#undef IS_FLOAT
#undef ITYPE
#undef T
#undef SUFFIX

/* Elements the kernels may read past the end of each operand (cpu.py allocates that slack). */
int64_t na_read_slack(void) { return VL; }

/* Whether this CPU runs the x86-64-v3 build (AVX2, FMA, BMI1/2; setup.py). cpu.py asks the portable
 * build before loading that one: on an older CPU it would die of an illegal instruction. GCC >= 12
 * tests the whole level; otherwise the features the kernels' code can contain are tested. */
int na_cpu_runs_x86_64_v3(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v3") != 0;
#elif defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
           __builtin_cpu_supports("bmi2");
#else
    return 0;
#endif
}
