/*
 * Fused CPU kernels of the QAT fake-quantization (amct_pytorch.qat.functional).
 *
 * The composite torch path runs four element-wise passes for the ULQ forward and seven for
 * its backward; on a CPU they are bound by memory traffic, so one pass that does all the
 * arithmetic per element is several times faster. Each kernel computes exactly what the
 * composite path and the amct_core definitions compute (reference section 3.4):
 *
 *   ulq_forward:  out = clamp(rint(x * inv), k_lo, k_hi) * scale
 *   ulq_backward: grad_x = g where k_lo <= rint(x * inv) <= k_hi, else 0; and the sums
 *                 sum(g * (t - r)) over those elements (t = x * inv, r = rint(t)),
 *                 sum(g) where r > k_hi and sum(g) where r < k_lo
 *   arq_forward:  per channel s = max|w| / (2^(b-1) - 1) (or |min| / 2^(b-1) when the
 *                 negative side is larger; < FLT_EPSILON -> 1) and
 *                 out = clamp(rint(w * (1/s)), qmin, qmax) * s
 *
 * All arithmetic is float32 with round-to-nearest-even. rint is computed as
 * (c + 1.5 * 2^23) - 1.5 * 2^23, exact for |c| < 2^22 and vectorizable without SSE4.1, on a
 * value first clamped to the integer range (clamping to integer bounds and rounding commute),
 * so it never sees a larger one; NaN stays NaN. The module must therefore not be compiled
 * with -ffast-math, nor with multiply-add contraction (setup.py passes -ffp-contract=off;
 * -fno-trapping-math and -fopenmp-simd, which change no result, let the compiler vectorize
 * the loops). The sums are float over blocks of 128 elements (in SIMD
 * lanes), added into double accumulators.
 *
 * The tensors are passed as addresses (torch.Tensor.data_ptr()) of contiguous float32
 * buffers; the Python side checks dtype, device and layout before calling. The GIL is
 * released while the kernels run; large tensors are split over POSIX threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef _WIN32
#include <pthread.h>
#define AMCT_HAVE_THREADS 1
#else
#define AMCT_HAVE_THREADS 0
#endif

#define MAGIC 12582912.0f     /* 1.5 * 2^23 */

/* x86-64 with GCC: an AVX2 version of the element-wise loops beside the baseline one, chosen
 * when the module loads (function multi-versioning); elsewhere the baseline only. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define AMCT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define AMCT_CLONES
#endif
#define BLOCK 128
#define MAX_THREADS 64
/* Starting a thread costs tens of microseconds: below these sizes one thread is faster. */
#define FORWARD_PER_THREAD 2097152
#define BACKWARD_PER_THREAD 524288

/* rint(c) with ties to even, exact for |c| < 2^22 (the callers clamp c to such a range). */
static inline float round_half_even(float c) { return (c + MAGIC) - MAGIC; }

/* ---- ULQ forward ------------------------------------------------------------------------- */

typedef struct {
    const float *x;
    float *out;
    Py_ssize_t begin, end;
    float inv, k_lo, k_hi, scale;
} ForwardTask;

AMCT_CLONES static void ulq_forward_range(const ForwardTask *task) {
    const float *restrict x = task->x;
    float *restrict out = task->out;
    const float inv = task->inv, k_lo = task->k_lo, k_hi = task->k_hi, scale = task->scale;
    /* clamp(rint(t), k_lo, k_hi) = rint(clamp(t, k_lo, k_hi)) for integer bounds, and the
     * clamped value is within the exact range of the rounding (NaN stays NaN). */
    for (Py_ssize_t i = task->begin; i < task->end; ++i) {
        float c = x[i] * inv;
        c = (c < k_lo) ? k_lo : c;
        c = (c > k_hi) ? k_hi : c;
        out[i] = round_half_even(c) * scale;
    }
}

/* ---- ULQ backward ------------------------------------------------------------------------ */

typedef struct {
    const float *x, *g;
    float *grad_x;
    Py_ssize_t begin, end;
    float inv, k_lo, k_hi;
    double inside_err, upper, lower; /* results */
} BackwardTask;

/* The rounded t, exact where it decides anything: t is first clamped to [k_lo - 1, k_hi + 1]
 * (integers), which changes neither which side of the range rint(t) falls on nor t - rint(t)
 * inside it. */
#define ROUNDED(t) round_half_even(((t) < lo1) ? lo1 : (((t) > hi1) ? hi1 : (t)))

AMCT_CLONES static void ulq_backward_range(BackwardTask *task) {
    const float *restrict x = task->x;
    const float *restrict g = task->g;
    float *restrict gx = task->grad_x;
    const float inv = task->inv, k_lo = task->k_lo, k_hi = task->k_hi;
    const float lo1 = k_lo - 1.0f, hi1 = k_hi + 1.0f;
    double inside_err = 0.0, upper = 0.0, lower = 0.0;
    Py_ssize_t i = task->begin;
    for (; i + BLOCK <= task->end; i += BLOCK) {
        float s_err = 0.0f, s_up = 0.0f, s_lo = 0.0f;
#pragma omp simd reduction(+ : s_err, s_up, s_lo)
        for (Py_ssize_t e = i; e < i + BLOCK; ++e) {
            const float t = x[e] * inv;
            const float r = ROUNDED(t);
            const float gv = g[e];
            const int below = r < k_lo;
            const int above = r > k_hi;
            const int outside = below | above;
            gx[e] = outside ? 0.0f : gv;
            s_err += outside ? 0.0f : gv * (t - r);
            s_up += above ? gv : 0.0f;
            s_lo += below ? gv : 0.0f;
        }
        inside_err += s_err;
        upper += s_up;
        lower += s_lo;
    }
    for (; i < task->end; ++i) {
        const float t = x[i] * inv;
        const float r = ROUNDED(t);
        const float gv = g[i];
        const int below = r < k_lo;
        const int above = r > k_hi;
        gx[i] = (below | above) ? 0.0f : gv;
        if (!(below | above)) inside_err += (double)(gv * (t - r));
        if (above) upper += gv;
        if (below) lower += gv;
    }
    task->inside_err = inside_err;
    task->upper = upper;
    task->lower = lower;
}

/* ---- threads ----------------------------------------------------------------------------- */

static int split_count(Py_ssize_t n, int threads, Py_ssize_t per_thread) {
    if (!AMCT_HAVE_THREADS || threads < 2 || n < 2 * per_thread) return 1;
    Py_ssize_t most = n / per_thread;
    int count = threads < MAX_THREADS ? threads : MAX_THREADS;
    return (Py_ssize_t)count < most ? count : (int)most;
}

/* The bounds of part `index` of `count` over [0, n), aligned to BLOCK elements. */
static void part_bounds(Py_ssize_t n, int count, int index, Py_ssize_t *begin, Py_ssize_t *end) {
    Py_ssize_t blocks = (n + BLOCK - 1) / BLOCK;
    Py_ssize_t first = blocks * index / count, last = blocks * (index + 1) / count;
    *begin = first * BLOCK;
    *end = last * BLOCK < n ? last * BLOCK : n;
}

static void *forward_thread(void *arg) {
    ulq_forward_range((const ForwardTask *)arg);
    return NULL;
}

static void *backward_thread(void *arg) {
    ulq_backward_range((BackwardTask *)arg);
    return NULL;
}

/* Run `body` on tasks[1..count-1] in new threads and on tasks[0] here; a task whose thread
 * cannot be started (or every task, without POSIX threads) runs here instead. */
static void run_tasks(void *(*body)(void *), void *tasks, size_t size, int count) {
#if AMCT_HAVE_THREADS
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < count; ++t) {
        started[t] = pthread_create(&ids[t], NULL, body, (char *)tasks + size * t) == 0;
        if (!started[t]) body((char *)tasks + size * t);
    }
    body(tasks);
    for (int t = 1; t < count; ++t) {
        if (started[t]) pthread_join(ids[t], NULL);
    }
#else
    for (int t = 0; t < count; ++t) body((char *)tasks + size * t);
#endif
}

/* ---- ARQ forward ------------------------------------------------------------------------- */

AMCT_CLONES static void arq_forward_run(const float *restrict w, float *restrict out,
                                        float *restrict scales, Py_ssize_t outer,
                                        Py_ssize_t channels, Py_ssize_t inner, int num_bits) {
    const float half = (float)(1 << (num_bits - 1));
    const float qmin = -half, qmax = half - 1.0f;
    for (Py_ssize_t c = 0; c < channels; ++c) {
        float lo = INFINITY, hi = -INFINITY;
        int nan = 0;
        for (Py_ssize_t o = 0; o < outer; ++o) {
            const float *row = w + (o * channels + c) * inner;
            /* the order of a min/max reduction does not change its value (NaN is counted
             * apart; |-0| = |+0| for the scale) */
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : nan)
            for (Py_ssize_t i = 0; i < inner; ++i) {
                const float v = row[i];
                lo = v < lo ? v : lo;
                hi = v > hi ? v : hi;
                nan |= v != v;
            }
        }
        if (nan) lo = hi = NAN;
        const float neg = fabsf(lo), pos = fabsf(hi);
        float s = (neg > pos) ? neg / half : pos / (half - 1.0f);
        if (s < FLT_EPSILON) s = 1.0f;
        scales[c] = s;
        const float inv = 1.0f / s;
        for (Py_ssize_t o = 0; o < outer; ++o) {
            const Py_ssize_t base = (o * channels + c) * inner;
            for (Py_ssize_t i = 0; i < inner; ++i) {
                float q = w[base + i] * inv;
                q = (q < qmin) ? qmin : q;
                q = (q > qmax) ? qmax : q;
                out[base + i] = round_half_even(q) * s;
            }
        }
    }
}

/* ---- Python bindings --------------------------------------------------------------------- */

static PyObject *py_ulq_forward(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, out;
    Py_ssize_t n;
    float inv, k_lo, k_hi, scale;
    int threads;
    if (!PyArg_ParseTuple(args, "KKnffffi", &x, &out, &n, &inv, &k_lo, &k_hi, &scale,
                          &threads))
        return NULL;
    int count = split_count(n, threads, FORWARD_PER_THREAD);
    ForwardTask tasks[MAX_THREADS];
    for (int t = 0; t < count; ++t) {
        tasks[t] = (ForwardTask){(const float *)(uintptr_t)x, (float *)(uintptr_t)out, 0, 0,
                                 inv, k_lo, k_hi, scale};
        part_bounds(n, count, t, &tasks[t].begin, &tasks[t].end);
    }
    Py_BEGIN_ALLOW_THREADS
    run_tasks(forward_thread, tasks, sizeof(ForwardTask), count);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_ulq_backward(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, g, grad_x;
    Py_ssize_t n;
    float inv, k_lo, k_hi;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKnfffi", &x, &g, &grad_x, &n, &inv, &k_lo, &k_hi,
                          &threads))
        return NULL;
    int count = split_count(n, threads, BACKWARD_PER_THREAD);
    BackwardTask tasks[MAX_THREADS];
    for (int t = 0; t < count; ++t) {
        tasks[t] = (BackwardTask){(const float *)(uintptr_t)x, (const float *)(uintptr_t)g,
                                  (float *)(uintptr_t)grad_x, 0, 0, inv, k_lo, k_hi,
                                  0.0, 0.0, 0.0};
        part_bounds(n, count, t, &tasks[t].begin, &tasks[t].end);
    }
    Py_BEGIN_ALLOW_THREADS
    run_tasks(backward_thread, tasks, sizeof(BackwardTask), count);
    Py_END_ALLOW_THREADS
    double inside_err = 0.0, upper = 0.0, lower = 0.0;
    for (int t = 0; t < count; ++t) {
        inside_err += tasks[t].inside_err;
        upper += tasks[t].upper;
        lower += tasks[t].lower;
    }
    return Py_BuildValue("(ddd)", inside_err, upper, lower);
}

static PyObject *py_arq_forward(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long w, out, scales;
    Py_ssize_t outer, channels, inner;
    int num_bits;
    if (!PyArg_ParseTuple(args, "KKKnnni", &w, &out, &scales, &outer, &channels, &inner,
                          &num_bits))
        return NULL;
    if (num_bits < 2 || num_bits > 16) {
        PyErr_Format(PyExc_ValueError, "arq_forward: num_bits must be in [2, 16], got %d",
                     num_bits);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    arq_forward_run((const float *)(uintptr_t)w, (float *)(uintptr_t)out,
                    (float *)(uintptr_t)scales, outer, channels, inner, num_bits);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"ulq_forward", py_ulq_forward, METH_VARARGS,
     "ulq_forward(x, out, n, inverse, k_lo, k_hi, scale, threads): "
     "out = clamp(rint(x*inverse), k_lo, k_hi)*scale over n float32 elements at the addresses "
     "x and out."},
    {"ulq_backward", py_ulq_backward, METH_VARARGS,
     "ulq_backward(x, g, grad_x, n, inverse, k_lo, k_hi, threads) -> (sum g*(t-r) inside, "
     "sum g above, sum g below); grad_x = g inside, 0 outside."},
    {"arq_forward", py_arq_forward, METH_VARARGS,
     "arq_forward(w, out, scales, outer, channels, inner, num_bits): per-channel symmetric "
     "min-max fake-quant of a float32 (outer, channels, inner) buffer; scales gets s."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fused_quant",
    "Fused CPU kernels of the QAT fake-quantization (see amct_pytorch.qat.functional).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fused_quant(void) { return PyModule_Create(&module); }
