/*
 * All eigenvalues of a float32 symmetric tridiagonal matrix by bisection on Sturm counts, many
 * shifts at a time (amct_core.decompose.two_stage.tridiagonal_eigenvalues). Float64 is left to
 * LAPACK's ?sterf, faster there than bisection's 50 halvings per eigenvalue.
 *
 * For a shift x, the number of eigenvalues below x is the number of negative pivots of the
 * LDL^T factorisation of T - xI (Sylvester's law of inertia):
 *
 *     q_1 = d_1 - x,   q_i = (d_i - x) - e_{i-1}^2 / q_{i-1},   count = #{i : q_i <= 0},
 *
 * with a pivot smaller than pivmin = safmin * max(1, max e^2) in magnitude replaced by -pivmin
 * (LAPACK ?laebz). In floating point this is the exact count of a matrix whose entries differ
 * from T's by a few ulps (Kahan 1966; Demmel, Dhillon and Ren 1995), so bisection finds every
 * eigenvalue to within a few ulps of ||T|| (what ?sterf promises; measured, float32 ?sterf
 * strays further). Each eigenvalue is bisected until its interval is narrower than
 * max(ulp * ||T||, 2 ulp * |x|, pivmin) (LAPACK ?stebz's default tolerance); an interval that
 * holds several eigenvalues when it gets that narrow (a cluster) gives them all its midpoint.
 * The matrix is first scaled by a power of two (exact) so that e^2 stays in range.
 *
 * ?sterf (Pal-Walker-Kahan QR) is sequential, each rotation depending on the last; the Sturm
 * counts of independent shifts vectorise: LANES shifts share each load of d_i and e_i^2, and
 * their recurrences are independent, so the divisions pipeline. For n = 6144 in float32 that
 * is 0.054 s on one core (AVX-512) against ?sterf's 0.23 s. The eigenvalues are split by index
 * between threads, each bisecting its own ones from the Gershgorin interval: no
 * synchronisation, and the same result on any number of threads.
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

/* Shifts per Sturm pass: four AVX-512 registers. */
#define LANES 64
#define MAX_THREADS 16
/* Bisection halves an interval per round: 2 * (mantissa bits + exponent range) rounds reach
 * the tolerance from any Gershgorin interval; more means NaN input. */
#define MAX_ROUNDS 600

#if defined(__GNUC__) && defined(__x86_64__)
#define AMCT_X86 1
#define AMCT_AVX512 __attribute__((target("avx512f")))
#else
#define AMCT_X86 0
#endif

typedef void (*sturm_fn)(Py_ssize_t, const float *, const float *, float, const float *,
                         Py_ssize_t *);

/* counts[j] = the number of eigenvalues of T below x[j], j < LANES. The loop over the shifts
 * is the inner one, so that the compiler vectorises it; compiled twice, for AVX-512 and
 * portably. */
#define STURM_BODY                                                                       \
    float q[LANES];                                                                      \
    int c[LANES];                                                                        \
    for (int j = 0; j < LANES; ++j) {                                                    \
        float t = d[0] - x[j];                                                           \
        t = fabsf(t) < pivmin ? -pivmin : t;                                             \
        q[j] = t;                                                                        \
        c[j] = t <= 0;                                                                   \
    }                                                                                    \
    for (Py_ssize_t i = 1; i < n; ++i) {                                                 \
        const float di = d[i], ei = e2[i - 1];                                           \
        for (int j = 0; j < LANES; ++j) {                                                \
            float t = (di - x[j]) - ei / q[j];                                           \
            t = fabsf(t) < pivmin ? -pivmin : t;                                         \
            q[j] = t;                                                                    \
            c[j] += t <= 0;                                                              \
        }                                                                                \
    }                                                                                    \
    for (int j = 0; j < LANES; ++j) counts[j] = c[j];

static void sturm_plain(Py_ssize_t n, const float *d, const float *e2, float pivmin,
                        const float *x, Py_ssize_t *counts) {
    STURM_BODY
}
#if AMCT_X86
AMCT_AVX512 static void sturm_avx512(Py_ssize_t n, const float *d, const float *e2,
                                     float pivmin, const float *x, Py_ssize_t *counts) {
    STURM_BODY
}
#endif

static int avx512_supported(void) {
#if AMCT_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
    return 0;
#endif
}

typedef struct {
    Py_ssize_t n, first, last;
    const float *d, *e2;
    float *out;
    float pivmin, atol, ulp, gl, gu;
    float *scratch;       /* 5 * span + LANES reals */
    Py_ssize_t *counts;   /* 5 * span + LANES counts */
    sturm_fn sturm;
} bisect_job;

/* The bisection of eigenvalues first .. last - 1 (ascending order). An interval [lo, hi)
 * holds the eigenvalues nlo .. nhi - 1 (nlo = count(lo), nhi = count(hi)); each round splits
 * every interval that is still wide at its midpoint, keeping the halves that hold eigenvalues
 * of this range. */
static void *bisect_thread(void *arg) {
    const bisect_job *job = (const bisect_job *)arg;
    const Py_ssize_t span = job->last - job->first;
    float *lo = job->scratch, *hi = lo + 2 * span, *x = hi + 2 * span;
    Py_ssize_t *nlo = job->counts, *nhi = nlo + 2 * span, *cnt = nhi + 2 * span;
    Py_ssize_t active = 1;
    lo[0] = job->gl;
    hi[0] = job->gu;
    nlo[0] = 0;
    nhi[0] = job->n;
    for (int round = 0; active > 0; ++round) {
        /* Intervals narrow enough give their midpoint to their eigenvalues; the others are
         * packed to the front with their midpoints in x. */
        Py_ssize_t wide = 0;
        for (Py_ssize_t k = 0; k < active; ++k) {
            const float a = lo[k], b = hi[k], mid = a + (b - a) / 2;
            float tol = 2 * job->ulp * (fabsf(a) > fabsf(b) ? fabsf(a) : fabsf(b));
            if (tol < job->atol) tol = job->atol;
            if (tol < job->pivmin) tol = job->pivmin;
            if (b - a <= tol || !(mid > a && mid < b) || round >= MAX_ROUNDS) {
                const Py_ssize_t i0 = nlo[k] > job->first ? nlo[k] : job->first;
                const Py_ssize_t i1 = nhi[k] < job->last ? nhi[k] : job->last;
                for (Py_ssize_t i = i0; i < i1; ++i) job->out[i] = mid;
                continue;
            }
            lo[wide] = a;
            hi[wide] = b;
            nlo[wide] = nlo[k];
            nhi[wide] = nhi[k];
            x[wide] = mid;
            ++wide;
        }
        for (Py_ssize_t k = wide; k % LANES; ++k) x[k] = x[wide - 1];
        for (Py_ssize_t k = 0; k < wide; k += LANES)
            job->sturm(job->n, job->d, job->e2, job->pivmin, x + k, cnt + k);
        /* The halves of interval k go to slots 2k and 2k + 1, from the last interval down,
         * so that no interval is overwritten before it is split (a count outside
         * [nlo, nhi] is clamped into it); then the slots that hold eigenvalues of this range
         * are packed to the front. */
        for (Py_ssize_t k = wide - 1; k >= 0; --k) {
            Py_ssize_t c = cnt[k];
            const Py_ssize_t na = nlo[k], nb = nhi[k];
            if (c < na) c = na;
            if (c > nb) c = nb;
            const float a = lo[k], b = hi[k], mid = x[k];
            Py_ssize_t slot = 2 * k;
            if (c > na && c > job->first && na < job->last) {
                lo[slot] = a; hi[slot] = mid; nlo[slot] = na; nhi[slot] = c; ++slot;
            }
            if (nb > c && nb > job->first && c < job->last) {
                lo[slot] = mid; hi[slot] = b; nlo[slot] = c; nhi[slot] = nb; ++slot;
            }
            for (; slot < 2 * k + 2; ++slot) nhi[slot] = -1; /* empty */
        }
        Py_ssize_t next = 0;
        for (Py_ssize_t k = 0; k < 2 * wide; ++k) {
            if (nhi[k] < 0) continue;
            lo[next] = lo[k]; hi[next] = hi[k]; nlo[next] = nlo[k]; nhi[next] = nhi[k];
            ++next;
        }
        active = next;
    }
    return NULL;
}

/* eigenvalues(n, d, e, out, threads[, vectorised]): out[0 .. n-1] <- the eigenvalues of the
 * float32 tridiagonal matrix with diagonal d (n entries) and off-diagonal e (n - 1),
 * ascending. Addresses are integers. vectorised = 0 takes the portable loops even on an
 * AVX-512 CPU (the same arithmetic, lane by lane: the same results). Returns the threads
 * used. */
static PyObject *eigenvalues(PyObject *self, PyObject *args) {
    unsigned long long d_addr, e_addr, out_addr;
    int threads, vectorised = 1;
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "nKKKi|p", &n, &d_addr, &e_addr, &out_addr, &threads,
                          &vectorised))
        return NULL;
    if (n < 1 || !d_addr || !out_addr || (n > 1 && !e_addr)) {
        PyErr_SetString(PyExc_ValueError, "eigenvalues: n < 1, or a null address");
        return NULL;
    }
#if !AMCT_HAVE_THREADS
    threads = 1;
#endif
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)n;
    const float *d_in = (const float *)(uintptr_t)d_addr, *e_in = (const float *)(uintptr_t)e_addr;
    float *out = (float *)(uintptr_t)out_addr;
    /* The matrix is scaled by a power of two (exact) that brings its largest entry into
     * [1, 2), so that e^2 neither overflows nor underflows; the eigenvalues are scaled back.
     * e^2, pivmin and the Gershgorin interval are computed in double. */
    double amax = 0.0;
    int finite = 1;
    for (Py_ssize_t i = 0; i < n; ++i) {
        const double di = fabs(d_in[i]), ei = i + 1 < n ? fabs(e_in[i]) : 0.0;
        if (!isfinite(di) || !isfinite(ei)) finite = 0;
        if (di > amax) amax = di;
        if (ei > amax) amax = ei;
    }
    if (!finite) {
        PyErr_SetString(PyExc_ValueError, "eigenvalues: the matrix holds NaN or Inf");
        return NULL;
    }
    if (amax == 0.0) { /* the zero matrix: n zero eigenvalues, exactly */
        memset(out, 0, (size_t)n * sizeof(float));
        return PyLong_FromLong(1);
    }
    int exponent = 0;
    frexp(amax, &exponent);
    const double scale = ldexp(1.0, 1 - exponent);
    /* d and e^2, scaled, one after the other. */
    float *ds = PyMem_RawMalloc((size_t)(2 * n) * sizeof(float));
    if (!ds) return PyErr_NoMemory();
    float *e2 = ds + n;
    double emax2 = 0.0, gl = 0.0, gu = 0.0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        const double di = d_in[i] * scale;
        const double below = i + 1 < n ? fabs(e_in[i]) * scale : 0.0;
        const double above = i > 0 ? fabs(e_in[i - 1]) * scale : 0.0;
        ds[i] = (float)di;
        if (i + 1 < n) e2[i] = (float)below * (float)below;
        if (below * below > emax2) emax2 = below * below;
        if (i == 0 || di - below - above < gl) gl = di - below - above;
        if (i == 0 || di + below + above > gu) gu = di + below + above;
    }
    const double ulp = FLT_EPSILON;
    const double pivmin = FLT_MIN * (emax2 > 1.0 ? emax2 : 1.0);
    const double tnorm = fabs(gl) > fabs(gu) ? fabs(gl) : fabs(gu);
    /* Widened as LAPACK ?stebz does, so that count(gl) = 0 and count(gu) = n hold in floating
     * point. */
    const double pad = 2.1 * (tnorm * ulp * (double)n + 2.0 * pivmin);
    gl -= pad;
    gu += pad;
    const double atol = tnorm > 0.0 ? ulp * tnorm : pivmin;
    sturm_fn sturm = sturm_plain;
#if AMCT_X86
    if (vectorised && avx512_supported()) sturm = sturm_avx512;
#endif
    bisect_job jobs[MAX_THREADS];
    void *memory[2 * MAX_THREADS] = {NULL};
    int ok = 1;
    for (int t = 0; t < threads; ++t) {
        const Py_ssize_t first = n * t / threads, last = n * (t + 1) / threads;
        const Py_ssize_t size = 5 * (last - first) + LANES;
        memory[2 * t] = PyMem_RawMalloc((size_t)size * sizeof(float));
        memory[2 * t + 1] = PyMem_RawMalloc((size_t)size * sizeof(Py_ssize_t));
        if (!memory[2 * t] || !memory[2 * t + 1]) ok = 0;
        jobs[t] = (bisect_job){n, first, last, ds, e2, out, (float)pivmin, (float)atol,
                               (float)ulp, (float)gl, (float)gu, (float *)memory[2 * t],
                               (Py_ssize_t *)memory[2 * t + 1], sturm};
    }
    int used = 1;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
#if AMCT_HAVE_THREADS
        pthread_t ids[MAX_THREADS];
        int started[MAX_THREADS] = {0};
        for (int t = 1; t < threads; ++t)
            started[t] = pthread_create(&ids[t], NULL, bisect_thread, &jobs[t]) == 0;
#endif
        bisect_thread(&jobs[0]);
#if AMCT_HAVE_THREADS
        for (int t = 1; t < threads; ++t) {
            if (started[t]) {
                pthread_join(ids[t], NULL);
                ++used;
            } else {
                bisect_thread(&jobs[t]); /* no thread: this one does its share */
            }
        }
#endif
        Py_END_ALLOW_THREADS
    }
    for (int t = 0; t < 2 * threads; ++t) PyMem_RawFree(memory[t]);
    PyMem_RawFree(ds);
    if (!ok) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; ++i) out[i] = (float)(out[i] / scale);
    return PyLong_FromLong(used);
}

static PyMethodDef methods[] = {
    {"eigenvalues", eigenvalues, METH_VARARGS,
     "All eigenvalues of a symmetric tridiagonal matrix, ascending, by bisection on Sturm "
     "counts of many shifts at a time, on threads."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sturm_bisection",
    "Eigenvalues of a symmetric tridiagonal matrix by vectorised bisection.", -1, methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__sturm_bisection(void) { return PyModule_Create(&module); }
