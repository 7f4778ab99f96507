/*
 * Bulge chasing on two threads: the second stage of the two-stage tridiagonal reduction
 * (amct_core.decompose.two_stage.band_eigenvalues), band -> tridiagonal, eigenvalues only.
 *
 * LAPACK's ?sytrd_sb2st runs its sweeps in parallel only when LAPACK is built with OpenMP,
 * which the OpenBLAS in SciPy's wheels is not, so there it runs on one core while the other
 * waits. This module schedules the same work on POSIX threads. It does no arithmetic of its
 * own: every step is a call of LAPACK's ?sb2st_kernels (found by the Python side in the
 * library SciPy links against and passed here as an address), with the arguments, the working
 * layout and the per-sweep order of ?sytrd_sb2st, so the tridiagonal matrix is the one LAPACK
 * computes, bit for bit.
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
    job->kernels("L", &wantz, &type, &first, &last, &s, &n, &kd, &ib, job->a, &job->lda,
                 job->v, job->tau, &ldvt, job->work, 1);
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
    if (!kernels || !a || !v || !tau || !work || (itemsize != 4 && itemsize != 8)) {
        PyErr_SetString(PyExc_ValueError, "chase: null address or item size not 4 or 8");
        return NULL;
    }
    if (n < 2 || kd < 2 || lda < 2 * kd + 1 || per_thread < 2 * kd + 2) {
        PyErr_SetString(PyExc_ValueError,
                        "chase: needs n >= 2, kd >= 2, lda >= 2kd+1, work >= 2kd+2 per thread");
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
     "Band to tridiagonal bulge chasing on threads through LAPACK's ?sb2st_kernels."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_bulge_chasing",
    "Parallel bulge chasing of the two-stage tridiagonal reduction.", -1, methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bulge_chasing(void) { return PyModule_Create(&module); }
