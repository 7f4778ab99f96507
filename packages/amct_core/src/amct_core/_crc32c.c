/*
 * CRC-32C (Castagnoli polynomial 0x1EDC6F41, reflected 0x82F63B78), the checksum of LevelDB
 * tables and of TensorFlow checkpoints (amct_core.crc32c). With the CRC32 instruction of
 * SSE 4.2 where the CPU has it (about 8 bytes per 3 cycles), else slicing by 8 tables. The GIL
 * is released while a buffer is summed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static uint32_t tables[8][256];

static void build_tables(void) {
    for (uint32_t b = 0; b < 256; ++b) {
        uint32_t crc = b;
        for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
        tables[0][b] = crc;
    }
    for (uint32_t b = 0; b < 256; ++b)
        for (int t = 1; t < 8; ++t)
            tables[t][b] = (tables[t - 1][b] >> 8) ^ tables[0][tables[t - 1][b] & 0xFFu];
}

/* The running (pre-inverted) CRC over n bytes, eight bytes a step. */
static uint32_t software(uint32_t crc, const unsigned char *p, size_t n) {
    while (n >= 8) {
        uint32_t low, high;
        memcpy(&low, p, 4);
        memcpy(&high, p + 4, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        low = __builtin_bswap32(low);
        high = __builtin_bswap32(high);
#endif
        low ^= crc;
        crc = tables[7][low & 0xFF] ^ tables[6][(low >> 8) & 0xFF] ^
              tables[5][(low >> 16) & 0xFF] ^ tables[4][low >> 24] ^
              tables[3][high & 0xFF] ^ tables[2][(high >> 8) & 0xFF] ^
              tables[1][(high >> 16) & 0xFF] ^ tables[0][high >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ tables[0][(crc ^ *p++) & 0xFFu];
    return crc;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <nmmintrin.h>
#define AMCT_CRC_HARDWARE 1

__attribute__((target("sse4.2"))) static uint32_t hardware(uint32_t crc, const unsigned char *p,
                                                           size_t n) {
    uint64_t running = crc;
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        running = _mm_crc32_u64(running, word);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)running;
    while (n--) crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

static int has_hardware(void) {
#ifdef AMCT_CRC_HARDWARE
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    return 0;
#endif
}

static int use_hardware;

/* extend(data, crc=0): the CRC-32C of the bytes of `data` (any contiguous buffer) appended
 * to bytes whose CRC-32C is `crc`. */
static PyObject *extend(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned long crc = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*|k", &view, &crc)) return NULL;
    uint32_t running = ~(uint32_t)crc;
    const unsigned char *p = (const unsigned char *)view.buf;
    const size_t n = (size_t)view.len;
    Py_BEGIN_ALLOW_THREADS
#ifdef AMCT_CRC_HARDWARE
    if (use_hardware)
        running = hardware(running, p, n);
    else
#endif
        running = software(running, p, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong((unsigned long)~running);
}

static PyObject *hardware_available(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(use_hardware);
}

static PyMethodDef methods[] = {
    {"extend", extend, METH_VARARGS,
     "extend(data, crc=0): CRC-32C of data appended to bytes whose CRC-32C is crc."},
    {"hardware", hardware_available, METH_NOARGS,
     "Whether the CRC32 instruction of the CPU is used."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_crc32c",
                                    "CRC-32C of buffers.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__crc32c(void) {
    build_tables();
    use_hardware = has_hardware();
    return PyModule_Create(&module);
}
