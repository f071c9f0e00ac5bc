/* One fused kernel for the linear merge family (task arithmetic, linear, add_difference, ...).

   The torch path upcasts every input chunk to float32, runs one elementwise op per pass over the
   whole chunk and casts the result back: ~8 passes over memory for a two-model task arithmetic.
   This kernel does the same float32 operations, in the same order, on blocks small enough to stay
   in L1, straight from the inputs' raw bytes to the output's raw bytes. Each operation is an IEEE
   single-precision add, subtract, multiply or divide, rounded once, exactly as torch's CPU kernels
   round them, so the bits are the same as the torch path (the tests compare them). Contraction of
   a*b+c into a fused multiply-add would round once instead of twice: the build turns it off
   (-ffp-contract=off), and nothing here relies on -ffast-math.

   Python calls linear(out, out_code, n, inputs, codes, terms, weights, subtract, divisor, scale,
   anchor); see mergekitlite/methods/native.py for the meaning. The GIL is released while it runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dtypes.h"

#define ABI_VERSION 1
#define BLOCK 1024
#define MAX_INPUTS 256

/* The arithmetic, one pass over a block each. */

MULTIVERSION static void sub_block(float *restrict dst, const float *restrict a, const float *restrict b, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) dst[i] = a[i] - b[i];
}

MULTIVERSION static void mul_block(float *restrict dst, const float *restrict a, float w, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) dst[i] = a[i] * w;
}

MULTIVERSION static void scale_block(float *restrict dst, float w, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) dst[i] = dst[i] * w;
}

MULTIVERSION static void div_block(float *restrict dst, float d, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) dst[i] = dst[i] / d;
}

MULTIVERSION static void acc_block(float *restrict dst, const float *restrict a, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) dst[i] = dst[i] + a[i];
}

typedef struct {
    const char *in[MAX_INPUTS];
    int code[MAX_INPUTS];
    int used[MAX_INPUTS];
    Py_ssize_t n_inputs;
    Py_ssize_t terms[MAX_INPUTS];
    float weight[MAX_INPUTS];
    int has_weight[MAX_INPUTS];
    Py_ssize_t n_terms;
    Py_ssize_t subtract, anchor; /* -1: none */
    int has_divisor, has_scale;
    float divisor, scale;
    char *out;
    int out_code;
    Py_ssize_t n;
} Job;

/* Σⱼ wⱼ·(x[termⱼ] − x[subtract]) / divisor · scale + x[anchor], left to right, each step rounded. */
static void run(const Job *job, float *x, float *acc, float *tmp) {
    for (Py_ssize_t start = 0; start < job->n; start += BLOCK) {
        Py_ssize_t len = job->n - start < BLOCK ? job->n - start : BLOCK;
        for (Py_ssize_t k = 0; k < job->n_inputs; k++)
            if (job->used[k]) load(x + k * BLOCK, job->in[k], job->code[k], start, len);
        for (Py_ssize_t j = 0; j < job->n_terms; j++) {
            const float *v = x + job->terms[j] * BLOCK;
            float *dst = j == 0 ? acc : tmp;
            if (job->subtract >= 0) {
                sub_block(dst, v, x + job->subtract * BLOCK, len);
                if (job->has_weight[j]) scale_block(dst, job->weight[j], len);
                v = dst;
            } else if (job->has_weight[j]) {
                mul_block(dst, v, job->weight[j], len);
                v = dst;
            }
            if (j > 0)
                acc_block(acc, v, len);
            else if (v != acc)
                memcpy(acc, v, (size_t)len * 4);
        }
        if (job->has_divisor) div_block(acc, job->divisor, len);
        if (job->has_scale) scale_block(acc, job->scale, len);
        if (job->anchor >= 0) acc_block(acc, x + job->anchor * BLOCK, len);
        if (job->out_code == CODE_F32)
            memcpy(job->out + start * 4, acc, (size_t)len * 4);
        else if (job->out_code == CODE_BF16)
            store_bf16((uint16_t *)job->out + start, acc, len);
        else
            store_f16((uint16_t *)job->out + start, acc, len);
    }
}

static int read_index(PyObject *seq, Py_ssize_t i, Py_ssize_t *out) {
    PyObject *item = PySequence_GetItem(seq, i);
    if (!item) return -1;
    *out = PyLong_AsSsize_t(item);
    Py_DECREF(item);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *py_linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out_addr;
    int out_code;
    Py_ssize_t n, subtract, anchor;
    PyObject *inputs, *codes, *terms, *weights, *divisor, *scale;
    if (!PyArg_ParseTuple(args, "KinOOOOnOOn", &out_addr, &out_code, &n, &inputs, &codes, &terms, &weights,
                          &subtract, &divisor, &scale, &anchor))
        return NULL;
    Job job;
    memset(&job, 0, sizeof job);
    job.out = (char *)(uintptr_t)out_addr;
    job.out_code = out_code;
    job.n = n;
    job.subtract = subtract;
    job.anchor = anchor;
    job.n_inputs = PySequence_Size(inputs);
    job.n_terms = PySequence_Size(terms);
    if (job.n_inputs < 0 || job.n_terms < 0) return NULL;
    if (job.n_inputs > MAX_INPUTS || job.n_terms > MAX_INPUTS || job.n_terms < 1 || n < 0 ||
        PySequence_Size(codes) != job.n_inputs || PySequence_Size(weights) != job.n_terms ||
        out_code < CODE_F32 || out_code > CODE_F16) {
        PyErr_SetString(PyExc_ValueError, "linear: inconsistent arguments");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < job.n_inputs; k++) {
        Py_ssize_t addr, code;
        if (read_index(inputs, k, &addr) || read_index(codes, k, &code)) return NULL;
        if (code < CODE_F32 || code > CODE_F16) {
            PyErr_SetString(PyExc_ValueError, "linear: unknown dtype code");
            return NULL;
        }
        job.in[k] = (const char *)(uintptr_t)addr;
        job.code[k] = (int)code;
    }
    for (Py_ssize_t j = 0; j < job.n_terms; j++) {
        if (read_index(terms, j, &job.terms[j])) return NULL;
        if (job.terms[j] < 0 || job.terms[j] >= job.n_inputs) {
            PyErr_SetString(PyExc_IndexError, "linear: term index out of range");
            return NULL;
        }
        job.used[job.terms[j]] = 1;
        PyObject *w = PySequence_GetItem(weights, j);
        if (!w) return NULL;
        if (w != Py_None) {
            job.has_weight[j] = 1;
            job.weight[j] = (float)PyFloat_AsDouble(w); /* rounded to float32, as torch rounds a scalar */
        }
        Py_DECREF(w);
        if (PyErr_Occurred()) return NULL;
    }
    if ((subtract >= job.n_inputs) || (anchor >= job.n_inputs)) {
        PyErr_SetString(PyExc_IndexError, "linear: subtract/anchor index out of range");
        return NULL;
    }
    if (subtract >= 0) job.used[subtract] = 1;
    if (anchor >= 0) job.used[anchor] = 1;
    if (divisor != Py_None) {
        job.has_divisor = 1;
        job.divisor = (float)PyFloat_AsDouble(divisor);
    }
    if (scale != Py_None) {
        job.has_scale = 1;
        job.scale = (float)PyFloat_AsDouble(scale);
    }
    if (PyErr_Occurred()) return NULL;

    float *work = malloc(sizeof(float) * BLOCK * (size_t)(job.n_inputs + 2));
    if (!work) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS;
    run(&job, work, work + job.n_inputs * BLOCK, work + (job.n_inputs + 1) * BLOCK);
    Py_END_ALLOW_THREADS;
    free(work);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, "Fused float32 linear combination of raw input buffers (see methods/native.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "ABI_VERSION", ABI_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
