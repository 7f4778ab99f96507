/*
 * Bulge chasing on two threads: the second stage of the two-stage tridiagonal reduction
 * (amct_core.decompose.two_stage.band_eigenvalues), band -> tridiagonal, eigenvalues only.
 *
 * LAPACK's ?sytrd_sb2st runs its sweeps in parallel only when LAPACK is built with OpenMP,
 * which the OpenBLAS in SciPy's wheels is not, so there it runs on one core while the other
 * waits. This module schedules the same work on POSIX threads. Each step is either a call of
 * LAPACK's ?sb2st_kernels (found by the Python side in the library SciPy links against and
 * passed here as an address), with the arguments, the working layout and the per-sweep order
 * of ?sytrd_sb2st, so that the tridiagonal matrix is the one LAPACK computes, bit for bit; or,
 * for float32 on a CPU with AVX-512 (address 0), a call of the fused kernels below, which do
 * the same transformations twice as fast and round differently (the same result on any
 * number of threads).
 *
 * The schedule (Haidar, Ltaief, Dongarra, "Parallel reduction to condensed forms for symmetric
 * eigenvalue problems using aggregated fine-grained and memory-aware kernels", SC 2011):
 * sweep s (s = 1 .. n-1) annihilates column s and chases the bulge it creates down the band,
 * one kernel call ("step") at a time. Step p of sweep s touches the band where step p + 2 of
 * sweep s - 1 has finished with it, so it may start once sweep s - 1 has done p + 2 steps (or
 * has ended); nothing else orders two sweeps. Each thread takes groups of GROUP consecutive
 * sweeps (group g to thread g mod threads) and runs the sweeps of a group as a wavefront,
 * sweep s + 1 three steps behind sweep s, which meets every dependency inside the group and
 * keeps the thread's working set in its cache; only the first sweep of a group waits for the
 * thread that owns the sweep before it. Progress is published per sweep with release/acquire
 * atomics; a waiting thread spins briefly, then yields.
 *
 * The Householder vectors of a sweep are kept by the kernels at an offset set by the parity of
 * the sweep and its start column, as in LAPACK; sweeps in flight at the same time are at least
 * three steps (more than one band width of columns) apart, so they never share that storage.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifndef _WIN32
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#define AMCT_HAVE_THREADS 1
#else
#define AMCT_HAVE_THREADS 0
#endif

/* ?sb2st_kernels(uplo, wantz, ttype, st, ed, sweep, n, nb, ib, a, lda, v, tau, ldvt, work),
 * gfortran calling convention: every argument by reference, then the hidden length of the
 * CHARACTER argument. LOGICAL is a 4-byte integer. */
typedef void (*kernels_fn)(const char *, const int *, const int *, const int *, const int *,
                           const int *, const int *, const int *, const int *, void *,
                           const int *, void *, void *, const int *, void *, size_t);

#define GROUP 8
#define MAX_THREADS 16
#define SPINS_BEFORE_YIELD 256

#if AMCT_HAVE_THREADS
typedef atomic_int progress_t;
#define LOAD(p) atomic_load_explicit((p), memory_order_acquire)
#define STORE(p, v) atomic_store_explicit((p), (v), memory_order_release)
#else
typedef int progress_t;
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#endif

typedef struct {
    progress_t gate;  /* set to the number of threads once they have all been started */
    progress_t *progress;
} chase_shared;

typedef struct {
    kernels_fn kernels;
    int n, kd, lda, index;
    chase_shared *shared;
    char *a, *v, *tau, *work;  /* work: this thread's scratch */
} chase_job;

/* ---- The float32 kernels, fused ------------------------------------------------------
 *
 * LAPACK's ?sb2st_kernels spends a step in about ten level-2 BLAS calls on blocks of kd x kd
 * (symv, syr2, two gemv, two ger, nrm2, scal ...), each a full pass over its block with the
 * call overhead of OpenBLAS; for kd = 96 that is about 6 us a pair of steps. The functions
 * below do the same arithmetic in four passes over the two blocks a step touches (two of them
 * reads), with AVX-512 intrinsics, four columns at a time (the CPU is checked at run time,
 * fused_supported): the x = C v of the right
 * application is one pass, and the right update, the dot products of the left reflector and
 * the left update are one pass per column. Same transformations as LAPACK's kernels, rounded
 * differently (the reflector norms are summed in double).
 *
 * The working band is column-major with leading dimension lda; with ld = lda - 1 it is a
 * dense column-major view of the symmetric matrix (lower part): element (i, j), 1-based, is
 * at a[(i - j) + (j - 1) lda] = a[(j - 1) lda + (i - j)], so column j starts at
 * a + (j - 1) lda with its diagonal and runs down contiguously, and the next column is ld
 * entries further on than the element beside it. */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define AMCT_FUSED 1
#define AMCT_AVX512 __attribute__((target("avx512f")))

/* Store the lanes of k: a plain store when all sixteen are (masked stores are slower than
 * plain ones on some CPUs; all chunks but a column's last are full). */
AMCT_AVX512 static inline void store_rows(float *p, __mmask16 k, __m512 value) {
    if (k == (__mmask16)0xFFFF)
        _mm512_storeu_ps(p, value);
    else
        _mm512_mask_storeu_ps(p, k, value);
}

/* LAPACK ?larfg: the reflector H = I - tau (1; x')(1; x')^T with H (alpha; x) = (beta; 0);
 * alpha is replaced by beta and x by x'. */
AMCT_AVX512 static void larfg_s(int m, float *alpha, float *x, float *tau) {
    __m512d sums = _mm512_setzero_pd();
    for (int i = 0; i < m - 1; i += 8) {
        const int count = m - 1 - i;
        const __mmask16 k = count >= 8 ? (__mmask16)0xFF : (__mmask16)((1u << count) - 1u);
        const __m512d xi =
            _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_loadu_ps(k, x + i)));
        sums = _mm512_fmadd_pd(xi, xi, sums);
    }
    const double squares = m > 1 ? _mm512_reduce_add_pd(sums) : 0.0;
    if (m <= 1 || squares == 0.0) {
        *tau = 0.0f;
        return;
    }
    const double a = *alpha;
    const double beta = -copysign(sqrt(a * a + squares), a);
    const __m512 scale = _mm512_set1_ps((float)(1.0 / (a - beta)));
    *tau = (float)((beta - a) / beta);
    for (int i = 0; i < m - 1; i += 16) {
        const int count = m - 1 - i;
        const __mmask16 k = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
        store_rows(x + i, k, _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(k, x + i)));
    }
    *alpha = (float)beta;
}

/* The lanes of rows i .. i + 15 that are below row `end`. */
AMCT_AVX512 static inline __mmask16 rows_below(int i, int end) {
    const int count = end - i;
    return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
}

/* (sum of t0, sum of t1, sum of t2, sum of t3): the four horizontal sums together. */
AMCT_AVX512 static inline __m128 sum4(__m512 t0, __m512 t1, __m512 t2, __m512 t3) {
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(t0, t1), _mm512_unpackhi_ps(t0, t1));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(t2, t3), _mm512_unpackhi_ps(t2, t3));
    /* each 128-bit lane: (t0, t1, t2, t3) partial sums */
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44),
                                   _mm512_shuffle_ps(s01, s23, 0xEE));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Rows lo .. hi - 1 of the four columns c[q] (q = 0 .. 3) become
 * c[q] - a alpha[q] - b beta[q]: one pass that loads a and b once for the four columns. */
AMCT_AVX512 static void rank2_update4(int lo, int hi, const float *a, const float *b,
                                      const float alpha[4], const float beta[4],
                                      float *const c[4]) {
    const __m512 a0 = _mm512_set1_ps(alpha[0]), a1 = _mm512_set1_ps(alpha[1]),
                 a2 = _mm512_set1_ps(alpha[2]), a3 = _mm512_set1_ps(alpha[3]);
    const __m512 b0 = _mm512_set1_ps(beta[0]), b1 = _mm512_set1_ps(beta[1]),
                 b2 = _mm512_set1_ps(beta[2]), b3 = _mm512_set1_ps(beta[3]);
    for (int i = lo; i < hi; i += 16) {
        const __mmask16 k = rows_below(i, hi);
        const __m512 ai = _mm512_maskz_loadu_ps(k, a + i);
        const __m512 bi = _mm512_maskz_loadu_ps(k, b + i);
        store_rows(c[0] + i, k, _mm512_fnmadd_ps(bi, b0, _mm512_fnmadd_ps(
            ai, a0, _mm512_maskz_loadu_ps(k, c[0] + i))));
        store_rows(c[1] + i, k, _mm512_fnmadd_ps(bi, b1, _mm512_fnmadd_ps(
            ai, a1, _mm512_maskz_loadu_ps(k, c[1] + i))));
        store_rows(c[2] + i, k, _mm512_fnmadd_ps(bi, b2, _mm512_fnmadd_ps(
            ai, a2, _mm512_maskz_loadu_ps(k, c[2] + i))));
        store_rows(c[3] + i, k, _mm512_fnmadd_ps(bi, b3, _mm512_fnmadd_ps(
            ai, a3, _mm512_maskz_loadu_ps(k, c[3] + i))));
    }
}

/* LAPACK ?larfy, lower: the m x m symmetric block A (lower triangle, leading dimension ld)
 * becomes H A H, H = I - tau v v^T: w = A v, w -= (tau/2)(w.v) v, A -= tau (v w^T + w v^T).
 * The product A v takes four columns at a time below their 4 x 4 diagonal block: their dot
 * products with v and their contributions to w in one pass over the rows. */
AMCT_AVX512 static void larfy_s(int m, const float *v, float tau, float *A, int ld,
                                float *w) {
    if (tau == 0.0f) return;
    /* w holds whole chunks of 16 rows (the work buffer has room): it is loaded and stored
     * unmasked at the same 16-row offsets for every block of columns, so that each load is
     * served by the store before it (a masked or shifted store would stall it). */
    for (int i = 0; i < m; i += 16) _mm512_storeu_ps(w + i, _mm512_setzero_ps());
    int j = 0;
    for (; j + 4 <= m; j += 4) {
        const float *c0 = A + (ptrdiff_t)j * ld, *c1 = c0 + ld, *c2 = c1 + ld, *c3 = c2 + ld;
        const float v0 = v[j], v1 = v[j + 1], v2 = v[j + 2], v3 = v[j + 3];
        /* the diagonal block (lower triangle of rows and columns j .. j + 3) */
        float d0 = c0[j] * v0 + c0[j + 1] * v1 + c0[j + 2] * v2 + c0[j + 3] * v3;
        float d1 = c0[j + 1] * v0 + c1[j + 1] * v1 + c1[j + 2] * v2 + c1[j + 3] * v3;
        float d2 = c0[j + 2] * v0 + c1[j + 2] * v1 + c2[j + 2] * v2 + c2[j + 3] * v3;
        float d3 = c0[j + 3] * v0 + c1[j + 3] * v1 + c2[j + 3] * v2 + c3[j + 3] * v3;
        const __m512 b0 = _mm512_set1_ps(v0), b1 = _mm512_set1_ps(v1),
                     b2 = _mm512_set1_ps(v2), b3 = _mm512_set1_ps(v3);
        __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
        for (int i = (j + 4) & ~15; i < m; i += 16) {
            /* rows j + 4 .. m - 1 of this chunk; the others read as zeros */
            __mmask16 k = rows_below(i, m);
            if (i < j + 4) k &= (__mmask16)(0xFFFFu << (j + 4 - i));
            const __m512 vi = _mm512_maskz_loadu_ps(k, v + i);
            const __m512 x0 = _mm512_maskz_loadu_ps(k, c0 + i);
            const __m512 x1 = _mm512_maskz_loadu_ps(k, c1 + i);
            const __m512 x2 = _mm512_maskz_loadu_ps(k, c2 + i);
            const __m512 x3 = _mm512_maskz_loadu_ps(k, c3 + i);
            t0 = _mm512_fmadd_ps(x0, vi, t0);
            t1 = _mm512_fmadd_ps(x1, vi, t1);
            t2 = _mm512_fmadd_ps(x2, vi, t2);
            t3 = _mm512_fmadd_ps(x3, vi, t3);
            __m512 wi = _mm512_loadu_ps(w + i);
            wi = _mm512_fmadd_ps(b0, x0, wi);
            wi = _mm512_fmadd_ps(b1, x1, wi);
            wi = _mm512_fmadd_ps(b2, x2, wi);
            wi = _mm512_fmadd_ps(b3, x3, wi);
            _mm512_storeu_ps(w + i, wi);
        }
        const __m128 d = _mm_add_ps(sum4(t0, t1, t2, t3), _mm_setr_ps(d0, d1, d2, d3));
        _mm_storeu_ps(w + j, _mm_add_ps(_mm_loadu_ps(w + j), d));
    }
    for (; j < m; ++j) { /* at most three columns, at the bottom right */
        const float *c = A + (ptrdiff_t)j * ld;
        float t = c[j] * v[j];
        for (int i = j + 1; i < m; ++i) {
            t += c[i] * v[i];
            w[i] += v[j] * c[i];
        }
        w[j] += t;
    }
    __m512 dots = _mm512_setzero_ps();
    for (int i = 0; i < m; i += 16) {
        const __mmask16 k = rows_below(i, m);
        dots = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, w + i), _mm512_maskz_loadu_ps(k, v + i),
                               dots);
    }
    const __m512 alpha = _mm512_set1_ps(-0.5f * tau * _mm512_reduce_add_ps(dots));
    for (int i = 0; i < m; i += 16) {
        const __mmask16 k = rows_below(i, m);
        const __m512 wi = _mm512_fmadd_ps(alpha, _mm512_maskz_loadu_ps(k, v + i),
                                          _mm512_maskz_loadu_ps(k, w + i));
        store_rows(w + i, k, wi);
    }
    /* A -= tau (v w^T + w v^T): four columns at a time below their diagonal block, which
     * loads v and w once for the four. */
    for (j = 0; j + 4 <= m; j += 4) {
        float *const cols[4] = {A + (ptrdiff_t)j * ld, A + (ptrdiff_t)(j + 1) * ld,
                                A + (ptrdiff_t)(j + 2) * ld, A + (ptrdiff_t)(j + 3) * ld};
        for (int q = 0; q < 4; ++q) /* the diagonal block's lower triangle */
            for (int i = j + q; i < j + 4; ++i)
                cols[q][i] -= tau * (v[i] * w[j + q] + w[i] * v[j + q]);
        const float tw[4] = {tau * w[j], tau * w[j + 1], tau * w[j + 2], tau * w[j + 3]};
        const float tv[4] = {tau * v[j], tau * v[j + 1], tau * v[j + 2], tau * v[j + 3]};
        rank2_update4(j + 4, m, v, w, tw, tv, cols);
    }
    for (; j < m; ++j) { /* at most three columns, at the bottom right */
        float *c = A + (ptrdiff_t)j * ld;
        for (int i = j; i < m; ++i) c[i] -= tau * (v[i] * w[j] + w[i] * v[j]);
    }
}

/* Type 2 of ?sb2st_kernels: C (lm x ln, the block below the one just transformed) becomes
 * C H with the sweep's reflector (v, tau); a new reflector (u, tau_u) annihilates the first
 * column of C below its first row, and the other ln - 1 columns become H_u C. x = tau C v
 * takes four columns a pass; then four columns at a time get the right update and their dot
 * products with u, and the left update while they are in the first-level cache. */
AMCT_AVX512 static void right_then_left_s(int lm, int ln, const float *v, float tau, float *C,
                                          int ld, float *u, float *tau_u, float *x) {
    /* x holds whole chunks of 16 rows (the work buffer has room), loaded and stored
     * unmasked, so that each load is served by the store before it. */
    for (int i = 0; i < lm; i += 16) _mm512_storeu_ps(x + i, _mm512_setzero_ps());
    if (tau != 0.0f) {
        int j = 0;
        for (; j + 4 <= ln; j += 4) {
            const float *c0 = C + (ptrdiff_t)j * ld, *c1 = c0 + ld, *c2 = c1 + ld,
                        *c3 = c2 + ld;
            const __m512 b0 = _mm512_set1_ps(v[j]), b1 = _mm512_set1_ps(v[j + 1]),
                         b2 = _mm512_set1_ps(v[j + 2]), b3 = _mm512_set1_ps(v[j + 3]);
            for (int i = 0; i < lm; i += 16) {
                const __mmask16 k = rows_below(i, lm);
                __m512 xi = _mm512_loadu_ps(x + i);
                xi = _mm512_fmadd_ps(b0, _mm512_maskz_loadu_ps(k, c0 + i), xi);
                xi = _mm512_fmadd_ps(b1, _mm512_maskz_loadu_ps(k, c1 + i), xi);
                xi = _mm512_fmadd_ps(b2, _mm512_maskz_loadu_ps(k, c2 + i), xi);
                xi = _mm512_fmadd_ps(b3, _mm512_maskz_loadu_ps(k, c3 + i), xi);
                _mm512_storeu_ps(x + i, xi);
            }
        }
        for (; j < ln; ++j) {
            const float *c = C + (ptrdiff_t)j * ld;
            for (int i = 0; i < lm; ++i) x[i] += v[j] * c[i];
        }
        for (int i = 0; i < lm; ++i) x[i] *= tau;
    }
    /* First column: C[:, 0] - x v[0] into u (its head stays in C), zeros below the head,
     * then the new reflector from it. */
    const __m512 first = _mm512_set1_ps(v[0]);
    for (int i = 0; i < lm; i += 16) {
        const __mmask16 k = rows_below(i, lm);
        store_rows(u + i, k, _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(k, x + i), first,
                                                         _mm512_maskz_loadu_ps(k, C + i)));
        store_rows(C + i, k, _mm512_setzero_ps());
    }
    C[0] = u[0];
    u[0] = 1.0f;
    larfg_s(lm, C, u + 1, tau_u);
    const float tu = *tau_u;
    int j = 1;
    for (; j + 4 <= ln; j += 4) {
        float *c0 = C + (ptrdiff_t)j * ld, *c1 = c0 + ld, *c2 = c1 + ld, *c3 = c2 + ld;
        const __m512 b0 = _mm512_set1_ps(v[j]), b1 = _mm512_set1_ps(v[j + 1]),
                     b2 = _mm512_set1_ps(v[j + 2]), b3 = _mm512_set1_ps(v[j + 3]);
        /* y = tau_u u^T (C - x v^T) for the four columns, then C - x v^T - u y^T, the
         * right update recomputed rather than stored twice */
        __m512 y0 = _mm512_setzero_ps(), y1 = y0, y2 = y0, y3 = y0;
        for (int i = 0; i < lm; i += 16) {
            const __mmask16 k = rows_below(i, lm);
            const __m512 xi = _mm512_maskz_loadu_ps(k, x + i);
            const __m512 ui = _mm512_maskz_loadu_ps(k, u + i);
            y0 = _mm512_fmadd_ps(ui, _mm512_fnmadd_ps(xi, b0, _mm512_maskz_loadu_ps(k, c0 + i)),
                                 y0);
            y1 = _mm512_fmadd_ps(ui, _mm512_fnmadd_ps(xi, b1, _mm512_maskz_loadu_ps(k, c1 + i)),
                                 y1);
            y2 = _mm512_fmadd_ps(ui, _mm512_fnmadd_ps(xi, b2, _mm512_maskz_loadu_ps(k, c2 + i)),
                                 y2);
            y3 = _mm512_fmadd_ps(ui, _mm512_fnmadd_ps(xi, b3, _mm512_maskz_loadu_ps(k, c3 + i)),
                                 y3);
        }
        float y[4];
        _mm_storeu_ps(y, _mm_mul_ps(sum4(y0, y1, y2, y3), _mm_set1_ps(tu)));
        const float vj[4] = {v[j], v[j + 1], v[j + 2], v[j + 3]};
        float *const cols[4] = {c0, c1, c2, c3};
        rank2_update4(0, lm, x, u, vj, y, cols);
    }
    for (; j < ln; ++j) { /* at most three columns (ln = kd = 96 leaves three), vectorised as
                             * above: a scalar loop's chain of dependent additions took a
                             * quarter of this function's time */
        float *c = C + (ptrdiff_t)j * ld;
        const __m512 b = _mm512_set1_ps(v[j]);
        __m512 ys = _mm512_setzero_ps();
        for (int i = 0; i < lm; i += 16) {
            const __mmask16 k = rows_below(i, lm);
            ys = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, u + i),
                                 _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(k, x + i), b,
                                                  _mm512_maskz_loadu_ps(k, c + i)), ys);
        }
        const __m512 y = _mm512_set1_ps(tu * _mm512_reduce_add_ps(ys));
        for (int i = 0; i < lm; i += 16) {
            const __mmask16 k = rows_below(i, lm);
            store_rows(c + i, k, _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(k, u + i), y,
                                                  _mm512_fnmadd_ps(
                                                      _mm512_maskz_loadu_ps(k, x + i), b,
                                                      _mm512_maskz_loadu_ps(k, c + i))));
        }
    }
}

/* ?sb2st_kernels('L', wantz = false, type, st, ed, sweep, n, nb, ...) for float32 (1-based
 * st, ed, sweep as LAPACK's), on the working band a (leading dimension lda). */
static void fused_kernels_s(int type, int st, int ed, int sweep, int n, int nb, float *a,
                            int lda, float *vs, float *taus, float *work) {
    const int ld = lda - 1;
    const ptrdiff_t pos = (ptrdiff_t)((sweep - 1) % 2) * n + st - 1;
    float *v = vs + pos, *tau = taus + pos;
    float *diagonal = a + (ptrdiff_t)(st - 1) * lda; /* element (st, st) */
    if (type == 1) {
        const int lm = ed - st + 1;
        float *column = a + (ptrdiff_t)(st - 2) * lda + 1; /* element (st, st - 1) */
        v[0] = 1.0f;
        for (int i = 1; i < lm; ++i) {
            v[i] = column[i];
            column[i] = 0.0f;
        }
        larfg_s(lm, column, v + 1, tau);
        larfy_s(lm, v, *tau, diagonal, ld, work);
    } else if (type == 3) {
        larfy_s(ed - st + 1, v, *tau, diagonal, ld, work);
    } else {
        const int j1 = ed + 1, j2 = ed + nb < n ? ed + nb : n;
        const int ln = ed - st + 1, lm = j2 - j1 + 1;
        if (lm <= 0) return;
        const ptrdiff_t next = (ptrdiff_t)((sweep - 1) % 2) * n + j1 - 1;
        right_then_left_s(lm, ln, v, *tau, diagonal + nb, ld, vs + next, taus + next, work);
    }
}

#endif /* AMCT_FUSED */

/* Step p (1-based) of sweep s; returns 1 if it was the sweep's last. The kernel type and the
 * rows it covers follow the step numbering of ?sytrd_sb2st: step 1 creates the first
 * reflector (type 1), even steps apply the last reflector to the block below (type 2), odd
 * steps after the first annihilate the bulge and apply the new reflector (type 3). */
static int chase_step(const chase_job *job, int s, int p) {
    const int n = job->n, kd = job->kd, wantz = 0, ib = 1, ldvt = job->kd + 1;
    const int type = p == 1 ? 1 : (p % 2) + 2;
    const int column = type == 2 ? (p / 2) * kd + s : ((p + 1) / 2) * kd + s;
    int first = column - kd + 1, last = column < n ? column : n;
    int reach = type == 2 ? column : ((first >= last - 1 && last == n) ? n : 0);
    if (job->kernels)
        job->kernels("L", &wantz, &type, &first, &last, &s, &n, &kd, &ib, job->a, &job->lda,
                     job->v, job->tau, &ldvt, job->work, 1);
#ifdef AMCT_FUSED
    else
        fused_kernels_s(type, first, last, s, n, kd, (float *)job->a, job->lda,
                        (float *)job->v, (float *)job->tau, (float *)job->work);
#endif
    return reach >= n - 1;
}

static void wait_for(const progress_t *progress, int steps) {
    int spins = 0;
    while (LOAD(progress) < steps) {
#if AMCT_HAVE_THREADS
        if (++spins > SPINS_BEFORE_YIELD) {
            sched_yield();
            spins = 0;
        }
#endif
    }
}

static void *chase_thread(void *arg) {
    const chase_job *job = (const chase_job *)arg;
    const int sweeps = job->n - 1;
    wait_for(&job->shared->gate, 1);
    const int threads = LOAD(&job->shared->gate);
    progress_t *progress = job->shared->progress;
    for (int s0 = 1 + job->index * GROUP; s0 <= sweeps; s0 += threads * GROUP) {
        const int s1 = s0 + GROUP - 1 < sweeps ? s0 + GROUP - 1 : sweeps;
        int open = s0; /* the sweeps of the group before this one have ended */
        for (int time = 1; open <= s1; ++time) {
            for (int s = open; s <= s1; ++s) {
                const int p = time - 3 * (s - s0);
                if (p < 1) break;
                if (LOAD(&progress[s]) == INT_MAX) continue;
                if (s == s0 && s > 1) wait_for(&progress[s - 1], p + 2);
                if (chase_step(job, s, p)) {
                    STORE(&progress[s], INT_MAX);
                    while (open <= s1 && LOAD(&progress[open]) == INT_MAX) ++open;
                } else {
                    STORE(&progress[s], p);
                }
            }
        }
    }
    return NULL;
}

/* Whether the fused float32 kernels were compiled and this CPU can run them (AVX-512F). */
static int fused_supported(void) {
#ifdef AMCT_FUSED
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
    return 0;
#endif
}

static PyObject *fused_available(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(fused_supported());
}

/* chase(kernels, itemsize, n, kd, a, lda, v, tau, work, work_per_thread, threads)
 * Addresses are integers; a is the (2kd+1) x n Fortran-ordered working band of ?sytrd_sb2st
 * (the band in rows 0..kd, zeros below), v and tau hold at least 2n + kd + 1 entries, work
 * threads * work_per_thread entries. Returns the number of threads used. */
static PyObject *chase(PyObject *self, PyObject *args) {
    unsigned long long kernels, a, v, tau, work;
    int itemsize, n, kd, lda, threads;
    Py_ssize_t per_thread;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiiiKiKKKni", &kernels, &itemsize, &n, &kd, &a, &lda, &v,
                          &tau, &work, &per_thread, &threads))
        return NULL;
    if (!a || !v || !tau || !work || (itemsize != 4 && itemsize != 8) ||
        (!kernels && (itemsize != 4 || !fused_supported()))) {
        PyErr_SetString(PyExc_ValueError, "chase: null address, item size not 4 or 8, or no "
                        "kernels address where the fused float32 kernels cannot run");
        return NULL;
    }
    if (n < 2 || kd < 2 || lda < 2 * kd + 1 || per_thread < 2 * kd + 16) {
        PyErr_SetString(PyExc_ValueError,
                        "chase: needs n >= 2, kd >= 2, lda >= 2kd+1, work >= 2kd+16 per thread");
        return NULL;
    }
#if !AMCT_HAVE_THREADS
    threads = 1;
#endif
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    chase_shared shared;
    shared.progress = PyMem_RawCalloc((size_t)n + 1, sizeof(progress_t));
    if (!shared.progress) return PyErr_NoMemory();
    STORE(&shared.gate, 0);
    chase_job jobs[MAX_THREADS];
    for (int t = 0; t < threads; ++t) {
        jobs[t] = (chase_job){(kernels_fn)(uintptr_t)kernels, n, kd, lda, t, &shared,
                              (char *)(uintptr_t)a, (char *)(uintptr_t)v,
                              (char *)(uintptr_t)tau,
                              (char *)(uintptr_t)work + (size_t)t * per_thread * itemsize};
    }
    int used = 1;
    Py_BEGIN_ALLOW_THREADS
#if AMCT_HAVE_THREADS
    /* The threads wait at the gate until the count of those that started is known: a thread
     * that cannot be created leaves the work to the others instead of a hole in the order. */
    pthread_t ids[MAX_THREADS];
    while (used < threads && pthread_create(&ids[used], NULL, chase_thread, &jobs[used]) == 0)
        ++used;
#endif
    STORE(&shared.gate, used);
    chase_thread(&jobs[0]);
#if AMCT_HAVE_THREADS
    for (int t = 1; t < used; ++t) pthread_join(ids[t], NULL);
#endif
    Py_END_ALLOW_THREADS
    PyMem_RawFree(shared.progress);
    return PyLong_FromLong(used);
}
static PyMethodDef methods[] = {
    {"chase", chase, METH_VARARGS,
     "Band to tridiagonal bulge chasing on threads, through LAPACK's ?sb2st_kernels at the "
     "address given, or the fused float32 kernels where it is 0."},
    {"fused_available", fused_available, METH_NOARGS,
     "Whether the fused float32 kernels can run on this CPU."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_bulge_chasing",
    "Parallel bulge chasing of the two-stage tridiagonal reduction.", -1, methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bulge_chasing(void) { return PyModule_Create(&module); }
