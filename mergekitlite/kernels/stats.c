/* Native kernels for whole-tensor statistics (see methods/native_stats.py): the Gram statistic's per-row dot
   products and DELLA's ranks within a fiber.

   gram_rows: per-row dot products of float32 vectors, summed exactly as methods/primitives.pairwise_sum sums them.

   The Gram statistic (slerp, multislerp, karcher) needs, for every pair (i <= j) of a chunk's vectors and
   every row, the float64 sum of v_i[k]·v_j[k] over the row. The torch path widens each vector to float64,
   multiplies every pair into a new tensor and reduces it with a pairwise tree: about a dozen passes over
   memory per pair. Here each product is formed as it is needed (a product of two float32 values is exact in
   float64, as the torch path's is) and added by the same tree, in the same order, so the sums are the same
   bits: pad the row to a power of two, add the upper half into the lower (x + 0.0 where the padding is,
   which turns -0.0 into +0.0 as torch's padded add does), then add halves until one value is left.

   Python calls gram_rows(vectors, rows, cols, out): ``vectors`` are addresses of C-contiguous float32
   [rows, cols] buffers, ``out`` the address of a float64 [pairs, rows] buffer, pairs in the order
   (0,0), (0,1), ..., (0,n-1), (1,1), ... The GIL is released while it runs.

   fiber_rank_values: for each row of a float32 [rows, n] magnitude buffer, values[r] for each element, r its
   0-based ascending rank in the row with equal magnitudes ranked by position and every NaN above +inf in
   position order -- what sparsify.by_fiber_rank gives by sorting (bits << 32 | position). Here a stable LSD
   radix sort on the 31-bit keys (three 11-bit digits) does it in a few passes per row.

   variance_keys: SCE's selection keys, the float32 bit patterns of each element's population variance across
   the models' deltas, computed in float64 in sparsify.variance_key's order: mean = (δ₀ + δ₁ + ...) / n,
   var = ((δ₀ − mean)² + (δ₁ − mean)² + ...) / n, rounded once to float32. Returns whether some variance is
   NaN (its bits depend on NaN payloads, which torch propagates its own way: the caller then uses torch). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ABI_VERSION 1
#define MAX_VECTORS 64

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__INTEL_COMPILER)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

/* The buffers addressed by ``seq`` (a sequence of 1..MAX_VECTORS integers) into ``v``; their count, or -1 with an
   exception set (``what`` names the caller in the message). */
static Py_ssize_t read_vectors(PyObject *seq, const float **v, const char *what) {
    Py_ssize_t n = PySequence_Size(seq);
    if (n < 0) return -1;
    if (n < 1 || n > MAX_VECTORS) {
        PyErr_Format(PyExc_ValueError, "%s: %zd vectors (1 to %d)", what, n, MAX_VECTORS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_GetItem(seq, i);
        if (!item) return -1;
        unsigned long long addr = PyLong_AsUnsignedLongLong(item);
        Py_DECREF(item);
        if (PyErr_Occurred()) return -1;
        v[i] = (const float *)(uintptr_t)addr;
    }
    return n;
}

/* Σ a[k]·b[k] for k < n by primitives.pairwise_sum's tree; ``acc`` holds at least n doubles (the tree's
   first level has half elements, the largest power of two below n). */
MULTIVERSION static double tree_dot(const float *a, const float *b, Py_ssize_t n, double *acc) {
    if (n == 0) return 0.0;
    if (n == 1) return (double)a[0] * (double)b[0];
    Py_ssize_t half = 1;
    while (half * 2 < n) half *= 2; /* the largest power of two below n: n - half <= half */
    Py_ssize_t paired = n - half;
    for (Py_ssize_t k = 0; k < paired; k++)
        acc[k] = (double)a[k] * (double)b[k] + (double)a[k + half] * (double)b[k + half];
    for (Py_ssize_t k = paired; k < half; k++) acc[k] = (double)a[k] * (double)b[k] + 0.0;
    for (Py_ssize_t width = half / 2; width >= 1; width /= 2)
        for (Py_ssize_t k = 0; k < width; k++) acc[k] = acc[k] + acc[k + width];
    return acc[0];
}

static PyObject *py_gram_rows(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *vectors;
    Py_ssize_t rows, cols;
    unsigned long long out_addr;
    if (!PyArg_ParseTuple(args, "OnnK", &vectors, &rows, &cols, &out_addr)) return NULL;
    if (rows < 0 || cols < 0) {
        PyErr_SetString(PyExc_ValueError, "gram_rows: inconsistent arguments");
        return NULL;
    }
    const float *v[MAX_VECTORS];
    Py_ssize_t n = read_vectors(vectors, v, "gram_rows");
    if (n < 0) return NULL;
    double *out = (double *)(uintptr_t)out_addr;
    double *acc = malloc(sizeof(double) * (size_t)(cols > 0 ? cols : 1));
    if (!acc) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t r = 0; r < rows; r++) {
        Py_ssize_t pair = 0;
        for (Py_ssize_t i = 0; i < n; i++)
            for (Py_ssize_t j = i; j < n; j++, pair++)
                out[pair * rows + r] = tree_dot(v[i] + r * cols, v[j] + r * cols, cols, acc);
    }
    Py_END_ALLOW_THREADS;
    free(acc);
    Py_RETURN_NONE;
}

#define NAN_KEY 0x7f800001u /* one key for every NaN magnitude, above +inf's (primitives.NAN_KEY) */
#define DIGIT_BITS 11
#define DIGITS 3 /* 33 bits >= the 31 of a magnitude's key */
#define BINS (1 << DIGIT_BITS)

static inline uint32_t magnitude_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u > NAN_KEY ? NAN_KEY : u; /* magnitudes are >= 0: no sign bit; NaN payloads all rank alike */
}

/* The positions of ``keys`` sorted ascending, stable (LSD radix): returns ``a`` or ``b`` (both hold n), whichever
   ends up holding them. The three digits' histograms are counted in one pass; a digit that is the same for every
   key (common: magnitudes of bf16 differences have few low bits) moves nothing and is skipped. ``count`` holds
   DIGITS * BINS. */
static int32_t *radix_order(const uint32_t *keys, Py_ssize_t n, int32_t *a, int32_t *b, Py_ssize_t *count) {
    memset(count, 0, sizeof(Py_ssize_t) * DIGITS * BINS);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t k = keys[i];
        for (int d = 0; d < DIGITS; d++) count[d * BINS + ((k >> (d * DIGIT_BITS)) & (BINS - 1))]++;
    }
    for (Py_ssize_t i = 0; i < n; i++) a[i] = (int32_t)i;
    int32_t *src = a, *dst = b;
    for (int d = 0; d < DIGITS; d++) {
        Py_ssize_t *c = count + d * BINS;
        int shift = d * DIGIT_BITS;
        if (c[(keys[0] >> shift) & (BINS - 1)] == n) continue; /* one bin holds every key */
        Py_ssize_t sum = 0;
        for (int bin = 0; bin < BINS; bin++) {
            Py_ssize_t here = c[bin];
            c[bin] = sum;
            sum += here;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            int32_t pos = src[i];
            dst[c[(keys[pos] >> shift) & (BINS - 1)]++] = pos;
        }
        int32_t *t = src;
        src = dst;
        dst = t;
    }
    return src;
}

static PyObject *py_fiber_rank_values(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long mag_addr, values_addr, out_addr;
    Py_ssize_t rows, n;
    if (!PyArg_ParseTuple(args, "KnnKK", &mag_addr, &rows, &n, &values_addr, &out_addr)) return NULL;
    if (rows < 0 || n < 0 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fiber_rank_values: inconsistent arguments");
        return NULL;
    }
    const float *mag = (const float *)(uintptr_t)mag_addr;
    const int64_t *values = (const int64_t *)(uintptr_t)values_addr;
    int64_t *out = (int64_t *)(uintptr_t)out_addr;
    size_t words = (size_t)(n > 0 ? n : 1);
    uint32_t *keys = malloc(sizeof(uint32_t) * words);
    int32_t *order = malloc(sizeof(int32_t) * words);
    int32_t *tmp = malloc(sizeof(int32_t) * words);
    Py_ssize_t *count = malloc(sizeof(Py_ssize_t) * DIGITS * BINS);
    if (!keys || !order || !tmp || !count) {
        free(keys), free(order), free(tmp), free(count);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *row = mag + r * n;
        if (n == 0) continue;
        for (Py_ssize_t i = 0; i < n; i++) keys[i] = magnitude_key(row[i]);
        const int32_t *sorted = radix_order(keys, n, order, tmp, count);
        int64_t *dst = out + r * n;
        for (Py_ssize_t rank = 0; rank < n; rank++) dst[sorted[rank]] = values[rank];
    }
    Py_END_ALLOW_THREADS;
    free(keys), free(order), free(tmp), free(count);
    Py_RETURN_NONE;
}

static PyObject *py_variance_keys(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *vectors;
    Py_ssize_t n;
    unsigned long long out_addr;
    if (!PyArg_ParseTuple(args, "OnK", &vectors, &n, &out_addr)) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "variance_keys: inconsistent arguments");
        return NULL;
    }
    const float *v[MAX_VECTORS];
    Py_ssize_t m = read_vectors(vectors, v, "variance_keys");
    if (m < 0) return NULL;
    uint32_t *out = (uint32_t *)(uintptr_t)out_addr;
    int nan = 0;
    const double count = (double)m;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t i = 0; i < n; i++) {
        double mean = m == 1 ? (double)v[0][i] : (double)v[0][i] + (double)v[1][i];
        for (Py_ssize_t k = 2; k < m; k++) mean = mean + (double)v[k][i];
        mean = mean / count;
        double c = (double)v[0][i] - mean;
        double var = c * c;
        for (Py_ssize_t k = 1; k < m; k++) {
            c = (double)v[k][i] - mean;
            var = var + c * c;
        }
        var = var / count;
        nan |= var != var;
        float f = (float)var;
        memcpy(&out[i], &f, sizeof f);
    }
    Py_END_ALLOW_THREADS;
    return PyBool_FromLong(nan);
}

static PyMethodDef methods[] = {
    {"gram_rows", py_gram_rows, METH_VARARGS, "Per-row float64 dot products of float32 vectors."},
    {"fiber_rank_values", py_fiber_rank_values, METH_VARARGS, "values[rank] of each element within its row."},
    {"variance_keys", py_variance_keys, METH_VARARGS, "SCE's float32 variance keys of float32 deltas."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_stats", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__stats(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "ABI_VERSION", ABI_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
