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

typedef struct {
    int64_t j0;    /* first query column of the chunk */
    int64_t len;   /* queries in the chunk, 1..VL */
    int64_t shift; /* 1: the key column advances with the query; 0: all lanes share it */
} chunk_t;

/* Splits a row's queries into maximal runs whose first key column steps by 1 (interior) or 0
 * (clamped border), then cuts runs into vector chunks. A long interior run ends in a full-width
 * chunk that overlaps its predecessor rather than a masked partial one. Returns the chunk count. */
static int64_t make_chunks(const int64_t *colstart, int64_t W, chunk_t *chunks) {
    int64_t count = 0, j = 0;
    while (j < W) {
        int64_t len = 1, shift = 1;
        if (j + 1 < W) {
            const int64_t step = colstart[j + 1] - colstart[j];
            if (step == 0 || step == 1) {
                shift = step;
                while (j + len < W && colstart[j + len] - colstart[j + len - 1] == step) len++;
            }
        }
        for (int64_t done = 0; done < len; done += VL) {
            chunk_t ch = {j + done, len - done < VL ? len - done : VL, shift};
            if (shift && len >= VL && len - done < VL) { /* lanes before j + done are recomputed */
                ch.j0 = j + len - VL;
                ch.len = VL;
            }
            chunks[count++] = ch;
        }
        j += len;
    }
    return count;
}

/* What the dot-product kernels do with a chunk's kh*kw dot products before storing them. */
enum { STORE_DOTS, SOFTMAX, SOFTMAX_BACKWARD };

#define T float
#define SUFFIX f32
#define IS_FLOAT 1
#include "na_kernels.h"
#undef IS_FLOAT
#undef T
#undef SUFFIX

#define T double
#define SUFFIX f64
#define IS_FLOAT 0
#include "na_kernels.h"
#undef IS_FLOAT
#undef T
#undef SUFFIX

/* Elements the kernels may read past the end of each operand (cpu.py allocates that slack). */
int64_t na_read_slack(void) { return VL; }
