/*
 * out <- alpha (B - shift I) X + beta out for a symmetric band matrix B (half-width kd) and a
 * block X of k vectors, float32, on threads, for a CPU with AVX-512 (checked at run time):
 * the product of every step of the Chebyshev filter of amct_core.decompose.band_subspace.
 *
 * Through OpenBLAS the product is one matrix product per slab of 64 rows (each slab a dense
 * 64 x (64 + 2 kd) block): a quarter of those products multiply zeros outside the band, and
 * products of 64 rows run at about 140 GFLOP/s on two cores. Here the band is stored per group
 * of four rows, the 2 kd + 4 columns they span (zeros outside the band), and each group of
 * rows times 96 columns of X is one register block: 24 accumulators, a row of X (six vectors)
 * and four coefficients per step. A 6144 x 1488 block at kd = 96 on two cores: 21 ms (165
 * GFLOP/s on the band's entries) against 36 ms through the slabs; with rows that are not a
 * whole number of cache lines (1478 columns) 27 ms, hence the block widths of band_subspace.
 *
 * X and out are row-major (n x k, k floats per row, any k: the last columns are masked); the
 * groups' coefficients are D[g][c][q] = (B - shift I)[4g + q, 4g - kd + c], c < 2 kd + 4, zero
 * outside the band and the matrix. Each thread computes a contiguous range of row groups, so
 * out may hold the block two steps back of a three-term recurrence (each row of out is read
 * only for the same row of the result), but not X.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(_WIN32)
#include <immintrin.h>
#include <pthread.h>
#define AMCT_BAND_PRODUCT 1
#define AMCT_AVX512 __attribute__((target("avx512f")))
#endif

#define MAX_THREADS 16
/* Columns of X per register block: six vectors of 16. */
#define BLOCK_COLUMNS 96

typedef struct {
    int n, k, kd;
    const float *coef, *x;
    float *out;
    float alpha, beta;
    int first, last;  /* row groups of this thread */
} product_job;

#ifdef AMCT_BAND_PRODUCT

static __mmask16 lanes(int count) {
    if (count >= 16) return (__mmask16)0xFFFF;
    if (count <= 0) return (__mmask16)0;
    return (__mmask16)((1u << count) - 1u);
}

/* Rows 4g .. 4g + 3 (those below n) times columns j0 .. j0 + 95 of X (masked by `mask` where
 * `masked`: the last, partial block of columns). Inlined twice, so that the accumulators stay
 * in registers and the full blocks load without masks. */
AMCT_AVX512 static inline __attribute__((always_inline)) void
product_block(const product_job *job, int g, int j0, const __mmask16 *mask, int masked) {
    const int n = job->n, kd = job->kd, span = 2 * kd + 4;
    const size_t ld = (size_t)job->k;
    const int row = 4 * g, rows = n - row < 4 ? n - row : 4;
    const int start = row - kd;  /* column of the group's first coefficient */
    const int c0 = start > 0 ? start : 0, c1 = start + span < n ? start + span : n;
    const float *d = job->coef + (size_t)g * span * 4;
    __m512 acc[4][6];
    for (int q = 0; q < 4; ++q)
        for (int v = 0; v < 6; ++v) acc[q][v] = _mm512_setzero_ps();
    for (int c = c0; c < c1; ++c) {
        const float *xc = job->x + (size_t)c * ld + j0;
        __m512 xv[6];
        for (int v = 0; v < 6; ++v)
            xv[v] = masked ? _mm512_maskz_loadu_ps(mask[v], xc + 16 * v)
                           : _mm512_loadu_ps(xc + 16 * v);
        const float *dc = d + (size_t)(c - start) * 4;
        for (int q = 0; q < 4; ++q) {
            const __m512 b = _mm512_set1_ps(dc[q]);
            for (int v = 0; v < 6; ++v) acc[q][v] = _mm512_fmadd_ps(b, xv[v], acc[q][v]);
        }
    }
    const __m512 alpha = _mm512_set1_ps(job->alpha), beta = _mm512_set1_ps(job->beta);
    const int read = job->beta != 0.0f;
    for (int q = 0; q < 4; ++q) {
        if (q >= rows) break;
        float *o = job->out + (size_t)(row + q) * ld + j0;
        for (int v = 0; v < 6; ++v) {
            __m512 value = _mm512_mul_ps(alpha, acc[q][v]);
            if (masked) {
                if (read)
                    value = _mm512_fmadd_ps(beta, _mm512_maskz_loadu_ps(mask[v], o + 16 * v), value);
                _mm512_mask_storeu_ps(o + 16 * v, mask[v], value);
            } else {
                if (read) value = _mm512_fmadd_ps(beta, _mm512_loadu_ps(o + 16 * v), value);
                _mm512_storeu_ps(o + 16 * v, value);
            }
        }
    }
}

AMCT_AVX512 static void product_groups(const product_job *job) {
    const int k = job->k;
    for (int j0 = 0; j0 < k; j0 += BLOCK_COLUMNS) {
        __mmask16 mask[6];
        for (int v = 0; v < 6; ++v) mask[v] = lanes(k - j0 - 16 * v);
        if (j0 + BLOCK_COLUMNS <= k) {
            for (int g = job->first; g < job->last; ++g) product_block(job, g, j0, mask, 0);
        } else {
            for (int g = job->first; g < job->last; ++g) product_block(job, g, j0, mask, 1);
        }
    }
}

static void *product_thread(void *arg) {
    product_groups((const product_job *)arg);
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

/* step(n, k, kd, coef, x, out, alpha, beta, threads): out <- alpha (B - shift I) X + beta out
 * (addresses as integers; coef holds ceil(n/4) groups of (2 kd + 4) x 4 floats). */
static PyObject *step(PyObject *self, PyObject *args) {
    unsigned long long coef, x, out;
    int n, k, kd, threads;
    float alpha, beta;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiiKKKffi", &n, &k, &kd, &coef, &x, &out, &alpha, &beta,
                          &threads))
        return NULL;
    if (!coef || !x || !out || n < 1 || k < 1 || kd < 0 || x == out) {
        PyErr_SetString(PyExc_ValueError, "step: null address, n < 1, k < 1, kd < 0, or out "
                        "is X");
        return NULL;
    }
    if (!supported()) {
        PyErr_SetString(PyExc_RuntimeError, "step: this CPU has no AVX-512");
        return NULL;
    }
#ifdef AMCT_BAND_PRODUCT
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const int groups = (n + 3) / 4;
    if (threads > groups) threads = groups;
    product_job jobs[MAX_THREADS];
    for (int t = 0; t < threads; ++t) {
        jobs[t] = (product_job){n, k, kd, (const float *)(uintptr_t)coef,
                                (const float *)(uintptr_t)x, (float *)(uintptr_t)out, alpha, beta,
                                (int)((long long)groups * t / threads),
                                (int)((long long)groups * (t + 1) / threads)};
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; ++t)
        started[t] = pthread_create(&ids[t], NULL, product_thread, &jobs[t]) == 0;
    product_groups(&jobs[0]);
    /* A thread that could not be created: its groups on this one. */
    for (int t = 1; t < threads; ++t) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            product_groups(&jobs[t]);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    (void)threads;
    (void)alpha;
    (void)beta;
    PyErr_SetString(PyExc_RuntimeError, "step: not built for this platform");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"step", step, METH_VARARGS,
     "out <- alpha (B - shift I) X + beta out for a float32 band matrix B, on threads."},
    {"available", available, METH_NOARGS, "Whether this CPU can run the kernel (AVX-512F)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_band_product",
    "Band matrix times a block of vectors, on threads.", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__band_product(void) { return PyModule_Create(&module); }
