/* Per-row dot products of float32 vectors, summed exactly as methods/primitives.pairwise_sum sums them.

   The Gram statistic (slerp, multislerp, karcher) needs, for every pair (i <= j) of a chunk's vectors and
   every row, the float64 sum of v_i[k]·v_j[k] over the row. The torch path widens each vector to float64,
   multiplies every pair into a new tensor and reduces it with a pairwise tree: about a dozen passes over
   memory per pair. Here each product is formed as it is needed (a product of two float32 values is exact in
   float64, as the torch path's is) and added by the same tree, in the same order, so the sums are the same
   bits: pad the row to a power of two, add the upper half into the lower (x + 0.0 where the padding is,
   which turns -0.0 into +0.0 as torch's padded add does), then add halves until one value is left.

   Python calls gram_rows(vectors, rows, cols, out): ``vectors`` are addresses of C-contiguous float32
   [rows, cols] buffers, ``out`` the address of a float64 [pairs, rows] buffer, pairs in the order
   (0,0), (0,1), ..., (0,n-1), (1,1), ... The GIL is released while it runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

#define ABI_VERSION 1
#define MAX_VECTORS 64

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__INTEL_COMPILER)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

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
    Py_ssize_t n = PySequence_Size(vectors);
    if (n < 0) return NULL;
    if (n < 1 || n > MAX_VECTORS || rows < 0 || cols < 0) {
        PyErr_SetString(PyExc_ValueError, "gram_rows: inconsistent arguments");
        return NULL;
    }
    const float *v[MAX_VECTORS];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_GetItem(vectors, i);
        if (!item) return NULL;
        unsigned long long addr = PyLong_AsUnsignedLongLong(item);
        Py_DECREF(item);
        if (PyErr_Occurred()) return NULL;
        v[i] = (const float *)(uintptr_t)addr;
    }
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

static PyMethodDef methods[] = {
    {"gram_rows", py_gram_rows, METH_VARARGS, "Per-row float64 dot products of float32 vectors (see methods/native.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gram", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gram(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "ABI_VERSION", ABI_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
