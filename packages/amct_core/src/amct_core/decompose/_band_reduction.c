/*
 * Dense to band on threads: the first stage of the two-stage tridiagonal reduction
 * (amct_core.decompose.two_stage.reduce_to_band), float32, band half-width 96, on a CPU with
 * AVX-512 (checked at run time).
 *
 * The algorithm is the one of two_stage._blocked_reduce_to_band, one panel of kd = 96 columns
 * at a time: for the panel of columns i..i+kd-1 and the trailing matrix A22 = A[t:, t:],
 * t = i + kd (lower triangle stored, column-major),
 *
 *     panel = Q R,  Q = I - V T V^T          (LAPACK ?geqrt3, called at the address given)
 *     Y = A22 V                               (symmetric product)
 *     X = Y T,  W = X - 1/2 V (T^T V^T X)     (products of the panel's width)
 *     A22 <- A22 - V W^T - W V^T              (symmetric rank-2k update)
 *
 * Through OpenBLAS, the symmetric product of a 96-wide panel runs at 150-160 GFLOP/s on two
 * cores whose matrix product peaks at 207: OpenBLAS packs the whole trailing matrix (its
 * upper half read across, from the lower) for 96 products per element. The kernels below read
 * the trailing matrix where it lies, a 64 x 64 tile at a time, and use each tile twice, for
 * its rows and, mirrored, for its columns: about 200 GFLOP/s. The rank-2k update reads and
 * writes each tile of A22 once, 192 products per element, with no packing either.
 *
 * The threads of a call live for the whole reduction and meet at a barrier between the steps
 * of each panel. The symmetric product deals its column blocks of tiles round-robin, each
 * thread adding into a Y of its own (summed afterwards in thread order), and the update hands
 * out column blocks in order (an atomic counter; each element is updated by one thread with
 * the same arithmetic whichever it is), so for a given number of threads the result is the
 * same on every run. ?geqrt3 runs on the calling thread (OpenBLAS on one thread, as the
 * caller sets it), and factors the next panel as soon as the update has reached it, while the
 * other threads update the rest. No OpenBLAS threads run meanwhile: OpenBLAS's idle
 * workers spin for about 0.1 s after each threaded call, and a spinning worker halves the
 * speed of a thread of ours on the same core.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(_WIN32)
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#define AMCT_BAND_REDUCTION 1
#define AMCT_AVX512 __attribute__((target("avx512f")))
#endif

/* The band half-width (panel width) these kernels are written for: 6 vectors of 16 floats. */
#define KD 96
#define NV 6
/* Tiles of the symmetric product (TILE x TILE), column blocks of the rank-2k update. */
#define TILE 64
#define UPDATE_COLUMNS KD  /* the first block is the next panel (run_panels) */
#define MAX_THREADS 16
#define SPINS_BEFORE_YIELD 512

/* LAPACK ?geqrt3(m, n, a, lda, t, ldt, info), gfortran calling convention (all by reference,
 * no CHARACTER argument). */
typedef void (*geqrt3_fn)(const int *, const int *, float *, const int *, float *, const int *,
                          int *);

#ifdef AMCT_BAND_REDUCTION

typedef struct {
    atomic_int arrived;
    atomic_int phase;
    atomic_int count;
} barrier_t;

/* All threads of the call wait here until every one has arrived (spinning briefly, then
 * yielding the core). */
static void barrier_wait(barrier_t *b) {
    const int phase = atomic_load_explicit(&b->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) ==
        atomic_load_explicit(&b->count, memory_order_acquire) - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&b->phase, phase + 1, memory_order_release);
        return;
    }
    int spins = 0;
    while (atomic_load_explicit(&b->phase, memory_order_acquire) == phase) {
        if (++spins > SPINS_BEFORE_YIELD) sched_yield();
    }
}

typedef struct {
    /* The matrix (column-major, leading dimension lda), reflector scalars, ?geqrt3. */
    float *a;
    int n, lda;
    float *tau;
    geqrt3_fn geqrt3;
    int threads;
    barrier_t barrier;
    /* The current panel: columns start..start+KD-1, trailing matrix from row/column top,
     * rows = n - top. */
    int start, top, rows, stop;
    /* V and W column-major (leading dimension ldv, zero rows below the panel's rows for the
     * 64-row reads of the update); V, X row-major (rows x KD); Y and Z per thread. */
    float *vcol, *wcol, *vrow, *x;
    size_t ldv;
    float *y[MAX_THREADS];
    float *z[MAX_THREADS];
    float *t;     /* T, row-major, KD x KD */
    float *s;     /* -1/2 T^T V^T X, row-major, KD x KD */
    float *tcol;  /* ?geqrt3's T, column-major */
    atomic_int next_update;
    int info;
    int factored;  /* the next panel was factored ahead (see run_panels) */
} reduction_t;

typedef struct {
    reduction_t *r;
    int index;
} worker_t;

/* Rows [first, last) of this thread's share of `rows`, in multiples of 16. */
static void row_share(int rows, int threads, int index, int *first, int *last) {
    int per = (rows + threads - 1) / threads;
    per = (per + 15) & ~15;
    *first = index * per < rows ? index * per : rows;
    *last = (index + 1) * per < rows ? (index + 1) * per : rows;
}

/* ---- The symmetric product Y = A22 V, a tile at a time ---------------------------------- */

/* y[r, :] += sum_j t[r + j ld] v[j, :] for r < rows, j < cols (v, y row-major, KD wide). */
AMCT_AVX512 static void tile_rows(const float *t, size_t ld, int rows, int cols,
                                  const float *v, float *y) {
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        __m512 acc[4][NV];
        for (int q = 0; q < 4; ++q)
            for (int c = 0; c < NV; ++c) acc[q][c] = _mm512_loadu_ps(y + (size_t)(r + q) * KD + 16 * c);
        for (int j = 0; j < cols; ++j) {
            const float *vj = v + (size_t)j * KD;
            __m512 vv[NV];
            for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(vj + 16 * c);
            const float *tj = t + (size_t)j * ld + r;
            for (int q = 0; q < 4; ++q) {
                const __m512 b = _mm512_set1_ps(tj[q]);
                for (int c = 0; c < NV; ++c) acc[q][c] = _mm512_fmadd_ps(b, vv[c], acc[q][c]);
            }
        }
        for (int q = 0; q < 4; ++q)
            for (int c = 0; c < NV; ++c) _mm512_storeu_ps(y + (size_t)(r + q) * KD + 16 * c, acc[q][c]);
    }
    for (; r < rows; ++r) {
        __m512 acc[NV];
        for (int c = 0; c < NV; ++c) acc[c] = _mm512_loadu_ps(y + (size_t)r * KD + 16 * c);
        for (int j = 0; j < cols; ++j) {
            const __m512 b = _mm512_set1_ps(t[(size_t)j * ld + r]);
            for (int c = 0; c < NV; ++c)
                acc[c] = _mm512_fmadd_ps(b, _mm512_loadu_ps(v + (size_t)j * KD + 16 * c), acc[c]);
        }
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(y + (size_t)r * KD + 16 * c, acc[c]);
    }
}

/* y[j, :] += sum_r t[r + j ld] v[r, :] for j < cols, r < rows: the tile transposed. */
AMCT_AVX512 static void tile_columns(const float *t, size_t ld, int rows, int cols,
                                     const float *v, float *y) {
    int j = 0;
    for (; j + 4 <= cols; j += 4) {
        __m512 acc[4][NV];
        for (int q = 0; q < 4; ++q)
            for (int c = 0; c < NV; ++c) acc[q][c] = _mm512_loadu_ps(y + (size_t)(j + q) * KD + 16 * c);
        const float *tj = t + (size_t)j * ld;
        for (int r = 0; r < rows; ++r) {
            const float *vr = v + (size_t)r * KD;
            __m512 vv[NV];
            for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(vr + 16 * c);
            for (int q = 0; q < 4; ++q) {
                const __m512 b = _mm512_set1_ps(tj[(size_t)q * ld + r]);
                for (int c = 0; c < NV; ++c) acc[q][c] = _mm512_fmadd_ps(b, vv[c], acc[q][c]);
            }
        }
        for (int q = 0; q < 4; ++q)
            for (int c = 0; c < NV; ++c) _mm512_storeu_ps(y + (size_t)(j + q) * KD + 16 * c, acc[q][c]);
    }
    for (; j < cols; ++j) {
        __m512 acc[NV];
        for (int c = 0; c < NV; ++c) acc[c] = _mm512_loadu_ps(y + (size_t)j * KD + 16 * c);
        for (int r = 0; r < rows; ++r) {
            const __m512 b = _mm512_set1_ps(t[(size_t)j * ld + r]);
            for (int c = 0; c < NV; ++c)
                acc[c] = _mm512_fmadd_ps(b, _mm512_loadu_ps(v + (size_t)r * KD + 16 * c), acc[c]);
        }
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(y + (size_t)j * KD + 16 * c, acc[c]);
    }
}

/* The column block of tiles starting at column j0 of A22: its diagonal tile (mirrored into a
 * full symmetric copy) and every tile below it, each used for its rows and its columns. */
AMCT_AVX512 static void product_block(const reduction_t *r, int j0, float *y) {
    const int m = r->rows;
    const size_t ld = (size_t)r->lda;
    const float *a22 = r->a + (size_t)r->top * ld + r->top;
    const int cols = m - j0 < TILE ? m - j0 : TILE;
    float square[TILE * TILE];
    for (int j = 0; j < cols; ++j)
        for (int i = j; i < cols; ++i) {
            const float value = a22[(size_t)(j0 + j) * ld + j0 + i];
            square[j * TILE + i] = value;
            square[i * TILE + j] = value;
        }
    tile_rows(square, TILE, cols, cols, r->vrow + (size_t)j0 * KD, y + (size_t)j0 * KD);
    for (int i0 = j0 + cols; i0 < m; i0 += TILE) {
        const int rows = m - i0 < TILE ? m - i0 : TILE;
        const float *t = a22 + (size_t)j0 * ld + i0;
        tile_columns(t, ld, rows, cols, r->vrow + (size_t)i0 * KD, y + (size_t)j0 * KD);
        tile_rows(t, ld, rows, cols, r->vrow + (size_t)j0 * KD, y + (size_t)i0 * KD);
    }
}

/* ---- Products of the panel's width ------------------------------------------------------ */

/* out[r, :] = in[r, :] * m (row-major, KD wide, m KD x KD row-major) for r in [first, last),
 * plus add[r, :] when add is given (out may be in). */
AMCT_AVX512 static void times_square(const float *in, const float *m, const float *add,
                                     float *out, int first, int last) {
    int r = first;
    for (; r + 4 <= last; r += 4) {
        __m512 acc[4][NV];
        for (int q = 0; q < 4; ++q)
            for (int c = 0; c < NV; ++c)
                acc[q][c] = add ? _mm512_loadu_ps(add + (size_t)(r + q) * KD + 16 * c)
                                : _mm512_setzero_ps();
        for (int k = 0; k < KD; ++k) {
            __m512 row[NV];
            for (int c = 0; c < NV; ++c) row[c] = _mm512_loadu_ps(m + (size_t)k * KD + 16 * c);
            for (int q = 0; q < 4; ++q) {
                const __m512 b = _mm512_set1_ps(in[(size_t)(r + q) * KD + k]);
                for (int c = 0; c < NV; ++c) acc[q][c] = _mm512_fmadd_ps(b, row[c], acc[q][c]);
            }
        }
        for (int q = 0; q < 4; ++q)
            for (int c = 0; c < NV; ++c) _mm512_storeu_ps(out + (size_t)(r + q) * KD + 16 * c, acc[q][c]);
    }
    for (; r < last; ++r) {
        __m512 acc[NV];
        for (int c = 0; c < NV; ++c)
            acc[c] = add ? _mm512_loadu_ps(add + (size_t)r * KD + 16 * c) : _mm512_setzero_ps();
        for (int k = 0; k < KD; ++k) {
            const __m512 b = _mm512_set1_ps(in[(size_t)r * KD + k]);
            for (int c = 0; c < NV; ++c)
                acc[c] = _mm512_fmadd_ps(b, _mm512_loadu_ps(m + (size_t)k * KD + 16 * c), acc[c]);
        }
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(out + (size_t)r * KD + 16 * c, acc[c]);
    }
}

/* z += v[first:last, :]^T x[first:last, :] (KD x KD row-major; v, x row-major). */
AMCT_AVX512 static void transposed_product(const float *v, const float *x, float *z, int first,
                                           int last) {
    for (int k = 0; k < KD; k += 4) {
        __m512 acc[4][NV];
        for (int q = 0; q < 4; ++q)
            for (int c = 0; c < NV; ++c) acc[q][c] = _mm512_loadu_ps(z + (size_t)(k + q) * KD + 16 * c);
        for (int r = first; r < last; ++r) {
            __m512 row[NV];
            for (int c = 0; c < NV; ++c) row[c] = _mm512_loadu_ps(x + (size_t)r * KD + 16 * c);
            for (int q = 0; q < 4; ++q) {
                const __m512 b = _mm512_set1_ps(v[(size_t)r * KD + k + q]);
                for (int c = 0; c < NV; ++c) acc[q][c] = _mm512_fmadd_ps(b, row[c], acc[q][c]);
            }
        }
        for (int q = 0; q < 4; ++q)
            for (int c = 0; c < NV; ++c) _mm512_storeu_ps(z + (size_t)(k + q) * KD + 16 * c, acc[q][c]);
    }
}

/* ---- The rank-2k update ------------------------------------------------------------------ */

/* The update's register block: UPDATE_VECTORS vectors of 16 rows by UPDATE_WIDTH columns
 * (24 accumulators). 48 x 8 ran 3 % faster than 64 x 6 (its 96 columns of V and W for a
 * 48-row block stay closer to the core) and 32 x 12 10 % slower (twelve broadcasts per row). */
#define UPDATE_VECTORS 3
#define UPDATE_WIDTH 8
#define UPDATE_ROWS (16 * UPDATE_VECTORS)

/* acc[v][q] -= sum_k a[i0 + 16v + lane, k] b[j0 + q, k] (a, b column-major, leading dimension
 * ld). */
AMCT_AVX512 static inline void update_half(__m512 acc[UPDATE_VECTORS][UPDATE_WIDTH],
                                           const float *a, const float *b, size_t ld, int i0,
                                           int j0) {
    for (int k = 0; k < KD; ++k) {
        const float *ak = a + (size_t)k * ld + i0, *bk = b + (size_t)k * ld + j0;
        __m512 av[UPDATE_VECTORS];
        for (int v = 0; v < UPDATE_VECTORS; ++v) av[v] = _mm512_loadu_ps(ak + 16 * v);
        for (int q = 0; q < UPDATE_WIDTH; ++q) {
            const __m512 bq = _mm512_set1_ps(bk[q]);
            for (int v = 0; v < UPDATE_VECTORS; ++v)
                acc[v][q] = _mm512_fnmadd_ps(av[v], bq, acc[v][q]);
        }
    }
}

/* A22[:, c0:c1] -= V W^T + W V^T on and below the diagonal, UPDATE_ROWS rows x UPDATE_WIDTH
 * columns at a time (masked on the diagonal and at the last row: nothing above the diagonal is
 * read or written). */
AMCT_AVX512 static void update_block(const reduction_t *r, int c0, int c1) {
    const int m = r->rows;
    const size_t ld = (size_t)r->lda, ldv = r->ldv;
    float *a22 = r->a + (size_t)r->top * ld + r->top;
    for (int i0 = c0 & ~15; i0 < m; i0 += UPDATE_ROWS) {
        for (int j0 = c0; j0 < c1 && j0 < i0 + UPDATE_ROWS; j0 += UPDATE_WIDTH) {
            const int ncols = c1 - j0 < UPDATE_WIDTH ? c1 - j0 : UPDATE_WIDTH;
            __mmask16 mask[UPDATE_VECTORS][UPDATE_WIDTH];
            __m512 acc[UPDATE_VECTORS][UPDATE_WIDTH];
            for (int v = 0; v < UPDATE_VECTORS; ++v) {
                const int base = i0 + 16 * v;
                for (int q = 0; q < UPDATE_WIDTH; ++q) {
                    unsigned bits = 0;
                    if (q < ncols) {
                        const int lo = j0 + q - base > 0 ? j0 + q - base : 0;
                        const int hi = m - base < 16 ? m - base : 16;
                        if (hi > lo) bits = ((1u << hi) - 1u) & ~((1u << lo) - 1u);
                    }
                    mask[v][q] = (__mmask16)bits;
                    acc[v][q] = _mm512_maskz_loadu_ps(mask[v][q], a22 + (size_t)(j0 + q) * ld + base);
                }
            }
            /* Columns j0 + q >= c1 (q >= ncols) and rows past m read V and W below the
             * panel's rows: within the 64 zero rows of padding, never stored. */
            update_half(acc, r->vcol, r->wcol, ldv, i0, j0);
            update_half(acc, r->wcol, r->vcol, ldv, i0, j0);
            for (int v = 0; v < UPDATE_VECTORS; ++v)
                for (int q = 0; q < UPDATE_WIDTH; ++q)
                    _mm512_mask_storeu_ps(a22 + (size_t)(j0 + q) * ld + i0 + 16 * v, mask[v][q],
                                          acc[v][q]);
        }
    }
}

/* ---- One panel, per thread ---------------------------------------------------------------- */

/* V from the reflectors below the panel (unit diagonal, zeros above it), column-major and
 * row-major, for this thread's rows; and zero this thread's Y and Z. */
static void build_v(reduction_t *r, int index) {
    int first, last;
    row_share(r->rows, r->threads, index, &first, &last);
    const size_t ld = (size_t)r->lda;
    const float *panel = r->a + (size_t)r->start * ld + r->top;
    for (int i0 = first; i0 < last; i0 += 16) {
        const int i1 = i0 + 16 < last ? i0 + 16 : last;
        for (int c = 0; c < KD; ++c) {
            for (int i = i0; i < i1; ++i) {
                const float value = i > c ? panel[(size_t)c * ld + i] : (i == c ? 1.0f : 0.0f);
                r->vcol[(size_t)c * r->ldv + i] = value;
                r->vrow[(size_t)i * KD + c] = value;
            }
        }
    }
    memset(r->y[index], 0, sizeof(float) * (size_t)r->rows * KD);
    memset(r->z[index], 0, sizeof(float) * KD * KD);
    if (index == 0) {
        /* The 64 rows below the panel's rows, read (and not used) by the update. */
        for (int c = 0; c < KD; ++c) {
            memset(r->vcol + (size_t)c * r->ldv + r->rows, 0, sizeof(float) * 64);
            memset(r->wcol + (size_t)c * r->ldv + r->rows, 0, sizeof(float) * 64);
        }
    }
}

/* Y = sum of the threads' parts; X = Y T; this thread's Z = V^T X over its rows. */
AMCT_AVX512 static void form_x(reduction_t *r, int index) {
    int first, last;
    row_share(r->rows, r->threads, index, &first, &last);
    float *y = r->y[0];
    for (int t = 1; t < r->threads; ++t) {
        const float *part = r->y[t];
        for (size_t e = (size_t)first * KD; e < (size_t)last * KD; e += 16)
            _mm512_storeu_ps(y + e, _mm512_add_ps(_mm512_loadu_ps(y + e), _mm512_loadu_ps(part + e)));
    }
    for (int i0 = first; i0 < last; i0 += 64) {
        const int i1 = i0 + 64 < last ? i0 + 64 : last;
        times_square(y, r->t, NULL, r->x, i0, i1);
        transposed_product(r->vrow, r->x, r->z[index], i0, i1);
    }
}

/* S = -1/2 T^T Z, Z the sum of the threads' parts (calling thread only). */
AMCT_AVX512 static void form_s(reduction_t *r) {
    float *z = r->z[0];
    for (int t = 1; t < r->threads; ++t)
        for (int e = 0; e < KD * KD; e += 16)
            _mm512_storeu_ps(z + e, _mm512_add_ps(_mm512_loadu_ps(z + e), _mm512_loadu_ps(r->z[t] + e)));
    for (int c = 0; c < KD; ++c) {
        __m512 acc[NV];
        for (int d = 0; d < NV; ++d) acc[d] = _mm512_setzero_ps();
        for (int e = 0; e <= c; ++e) {  /* T is upper triangular: T[e, c] = 0 for e > c */
            const __m512 b = _mm512_set1_ps(-0.5f * r->t[(size_t)e * KD + c]);
            for (int d = 0; d < NV; ++d)
                acc[d] = _mm512_fmadd_ps(b, _mm512_loadu_ps(z + (size_t)e * KD + 16 * d), acc[d]);
        }
        for (int d = 0; d < NV; ++d) _mm512_storeu_ps(r->s + (size_t)c * KD + 16 * d, acc[d]);
    }
}

/* W = X + V S (S = -1/2 T^T V^T X) for this thread's rows, stored column-major. */
AMCT_AVX512 static void form_w(reduction_t *r, int index) {
    int first, last;
    row_share(r->rows, r->threads, index, &first, &last);
    float rows[16 * KD];
    for (int i0 = first; i0 < last; i0 += 16) {
        const int count = last - i0 < 16 ? last - i0 : 16;
        /* rows[q, :] = X[i0 + q, :] + V[i0 + q, :] S, through a row-major block */
        times_square(r->vrow + (size_t)i0 * KD, r->s, r->x + (size_t)i0 * KD, rows, 0, count);
        for (int c = 0; c < KD; ++c)
            for (int q = 0; q < count; ++q) r->wcol[(size_t)c * r->ldv + i0 + q] = rows[q * KD + c];
    }
}

/* ?geqrt3 of the panel at column `start` (at least KD rows below it): its reflectors stay in
 * the matrix, its scalars go to tau and T to r->t (row-major). Returns ?geqrt3's info. */
static int factor_panel(reduction_t *r, int start) {
    const int top = start + KD, rows = r->n - top, ldt = KD, kd = KD;
    int info = 0;
    r->geqrt3(&rows, &kd, r->a + (size_t)start * r->lda + top, &r->lda, r->tcol, &ldt, &info);
    if (info != 0) return info;
    /* T is upper triangular; ?geqrt3 leaves the part below its diagonal as it was. */
    for (int c = 0; c < KD; ++c) {
        r->tau[start + c] = r->tcol[(size_t)c * KD + c];
        for (int d = 0; d < KD; ++d)
            r->t[(size_t)c * KD + d] = d >= c ? r->tcol[(size_t)d * KD + c] : 0.0f;
    }
    return 0;
}

static void run_panels(reduction_t *r, int index) {
    for (;;) {
        if (index == 0) {
            const int top = r->start + KD, rows = r->n - top;
            r->stop = rows < KD || r->info != 0;
            if (!r->stop) {
                r->top = top;
                r->rows = rows;
                if (!r->factored) r->info = factor_panel(r, r->start);
                r->factored = 0;
                r->stop = r->info != 0;
                /* The update's first column block is the calling thread's (see below). */
                atomic_store(&r->next_update, 1);
            }
        }
        barrier_wait(&r->barrier);
        if (r->stop) return;
        build_v(r, index);
        barrier_wait(&r->barrier);
        /* Column blocks dealt round-robin: each block's part of Y goes to the same thread's
         * Y on every run, so the sums (and the result) are the same from run to run. */
        for (int j0 = TILE * index; j0 < r->rows; j0 += TILE * r->threads)
            product_block(r, j0, r->y[index]);
        barrier_wait(&r->barrier);
        form_x(r, index);
        barrier_wait(&r->barrier);
        if (index == 0) form_s(r);
        barrier_wait(&r->barrier);
        form_w(r, index);
        barrier_wait(&r->barrier);
        if (index == 0) {
            /* Look ahead: the first KD columns of A22 are the next panel. Updated first, it is
             * factored here while the other threads go on with the rest of the update (which
             * does not touch those columns), instead of at the next panel's start with the
             * other threads waiting. */
            update_block(r, 0, r->rows < KD ? r->rows : KD);
            if (r->rows - KD >= KD) {
                r->info = factor_panel(r, r->start + KD);
                r->factored = r->info == 0;
            }
        }
        for (;;) {
            const int c0 = UPDATE_COLUMNS * atomic_fetch_add(&r->next_update, 1);
            if (c0 >= r->rows) break;
            update_block(r, c0, c0 + UPDATE_COLUMNS < r->rows ? c0 + UPDATE_COLUMNS : r->rows);
        }
        barrier_wait(&r->barrier);
        if (index == 0) r->start += KD;
    }
}

static void *worker(void *arg) {
    worker_t *w = arg;
    run_panels(w->r, w->index);
    return NULL;
}

static int supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") ? 1 : 0;
}

#else
static int supported(void) { return 0; }
#endif

static PyObject *available(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(supported());
}

/* reduce(geqrt3, n, a, lda, tau, threads) -> (next start column, ?geqrt3 info)
 * Reduces the float32 column-major matrix at address a (lower triangle) panel by panel, kd = 96,
 * for every panel with at least 96 rows below it, the reflector scalars going to tau; returns
 * the first column of the panel it left (the caller finishes a last, shorter panel) and the
 * info of a failed ?geqrt3 (0 when none failed). */
static PyObject *reduce(PyObject *self, PyObject *args) {
    unsigned long long geqrt3, a, tau;
    int n, lda, threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKiKi", &geqrt3, &n, &a, &lda, &tau, &threads)) return NULL;
    if (!geqrt3 || !a || !tau || n < 1 || lda < n) {
        PyErr_SetString(PyExc_ValueError, "reduce: null address, n < 1 or lda < n");
        return NULL;
    }
    if (!supported()) {
        PyErr_SetString(PyExc_RuntimeError, "reduce: this CPU has no AVX-512");
        return NULL;
    }
#ifdef AMCT_BAND_REDUCTION
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    reduction_t r;
    memset(&r, 0, sizeof(r));
    r.a = (float *)(uintptr_t)a;
    r.n = n;
    r.lda = lda;
    r.tau = (float *)(uintptr_t)tau;
    r.geqrt3 = (geqrt3_fn)(uintptr_t)geqrt3;
    r.threads = threads;
    const size_t rows = n > KD ? (size_t)(n - KD) : 1;
    /* Column stride of V and W: past the rows and the 64 padding rows, and an odd number of
     * cache lines, so that the 96 columns of a 64-row block do not share cache sets. */
    r.ldv = ((rows + 64 + 31) & ~(size_t)31) + 16;
    size_t floats = 2 * r.ldv * KD + 2 * rows * KD + 3 * KD * KD +
                    (size_t)threads * (rows * KD + KD * KD);
    float *memory = PyMem_RawMalloc(sizeof(float) * floats + 64);
    if (!memory) return PyErr_NoMemory();
    float *next = (float *)(((uintptr_t)memory + 63) & ~(uintptr_t)63);
    r.vcol = next; next += r.ldv * KD;
    r.wcol = next; next += r.ldv * KD;
    r.vrow = next; next += rows * KD;
    r.x = next; next += rows * KD;
    r.t = next; next += KD * KD;
    r.s = next; next += KD * KD;
    r.tcol = next; next += KD * KD;
    for (int t = 0; t < threads; ++t) {
        r.y[t] = next; next += rows * KD;
        r.z[t] = next; next += KD * KD;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_t ids[MAX_THREADS];
    worker_t workers[MAX_THREADS];
    int used = 1;
    /* The team is fixed before any panel starts: a thread that cannot be created leaves its
     * share to the others. */
    while (used < threads) {
        workers[used] = (worker_t){&r, used};
        if (pthread_create(&ids[used], NULL, worker, &workers[used]) != 0) break;
        ++used;
    }
    /* Threads that did start wait at the first barrier; set the count before they reach it. */
    r.threads = used;
    atomic_store_explicit(&r.barrier.count, used, memory_order_release);
    run_panels(&r, 0);
    for (int t = 1; t < used; ++t) pthread_join(ids[t], NULL);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(memory);
    return Py_BuildValue("ii", r.start, r.info);
#else
    (void)threads;
    PyErr_SetString(PyExc_RuntimeError, "reduce: not built for this platform");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"reduce", reduce, METH_VARARGS,
     "Dense to band (kd = 96, float32) on threads, with ?geqrt3 at the address given."},
    {"available", available, METH_NOARGS, "Whether this CPU can run the kernels (AVX-512F)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_band_reduction",
    "Dense to band reduction of the two-stage tridiagonal reduction, on threads.", -1, methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__band_reduction(void) { return PyModule_Create(&module); }
