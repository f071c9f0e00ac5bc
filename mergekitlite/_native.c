/* One fused kernel for the linear merge family (task arithmetic, linear, add_difference, ...).

   The torch path upcasts every input chunk to float32, runs one elementwise op per pass over the
   whole chunk and casts the result back: ~8 passes over memory for a two-model task arithmetic.
   This kernel does the same float32 operations, in the same order, on blocks small enough to stay
   in L1, straight from the inputs' raw bytes to the output's raw bytes. Each operation is an IEEE
   single-precision add, subtract, multiply or divide, rounded once, exactly as torch's CPU kernels
   round them, so the bits are the same as the torch path (the tests compare them). Contraction of
   a*b+c into a fused multiply-add would round once instead of twice: the build turns it off
   (-ffp-contract=off), and nothing here relies on -ffast-math.

   Non-finite values are counted on the way (the merge report and --strict need them): NaN/±inf in
   each input as it is loaded, and in the output as it is stored, with how many of those were finite
   before the cast (an overflow, e.g. 70000 → fp16 inf). The counts are exponent-bit tests folded into
   the load and store loops, which stay vectorised: they cost no measurable time
   (bench/RESULTS.md).

   Python calls linear(out, out_code, n, inputs, codes, terms, weights, subtract, divisor, scale,
   anchor) -> (per-input non-finite counts, non-finite outputs, overflows); see
   mergekitlite/methods/native.py for the meaning. The GIL is released while it runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dtypes.h" /* float formats: loads, roundings, CODE_*, MULTIVERSION (shared with kernels/gta.c) */

#define ABI_VERSION 3
#define BLOCK 1024
#define MAX_INPUTS 256

/* A value is NaN or ±inf exactly when its exponent bits are all ones. */
#define F32_EXP 0x7f800000u
#define BF16_EXP 0x7f80u
#define F16_EXP 0x7c00u

/* The stores return the largest magnitude they stored, as float32 bits (see count_block). */

static inline uint32_t magnitude(float f) { return f32_to_bits(f) & 0x7fffffffu; }

MULTIVERSION static uint32_t store_f32(float *restrict dst, const float *restrict src, Py_ssize_t len) {
    uint32_t top = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        top = magnitude(src[i]) > top ? magnitude(src[i]) : top;
        dst[i] = src[i];
    }
    return top;
}

MULTIVERSION static uint32_t store_bf16(uint16_t *restrict dst, const float *restrict src, Py_ssize_t len) {
    uint32_t top = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        top = magnitude(src[i]) > top ? magnitude(src[i]) : top;
        dst[i] = f32_to_bf16(src[i]);
    }
    return top;
}

/* This loop does not vectorise (f32_to_f16 branches): the maximum is a separate vectorised pass,
   cheaper than a compare in the scalar loop (measured 5% there, ~1% here). */
MULTIVERSION static void store_f16(uint16_t *restrict dst, const float *restrict src, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) dst[i] = f32_to_f16(src[i]);
}

MULTIVERSION static uint32_t max_magnitude(const float *restrict src, Py_ssize_t len) {
    uint32_t top = 0;
    for (Py_ssize_t i = 0; i < len; i++) top = magnitude(src[i]) > top ? magnitude(src[i]) : top;
    return top;
}

/* Non-finite values. A value is NaN or ±inf exactly when its magnitude bits are at least the
   all-ones exponent. Counting them in every input and output block (a compare and a widening add
   per value) cost 45% of the kernel's time, so the kernel only looks at the float32 result block:
   NaN and ±inf propagate through every step of the form (add, subtract, multiply by a number,
   divide by one), so a result block whose values all cast to finite output values proves the
   inputs it used finite and the output finite. The store loops find the block's largest magnitude
   as they go (an AND and an unsigned max per value, vectorised with them); the values are counted
   only in the rare block where it is too large. A separate pass for that maximum cost 10%. */

/* NaN/±inf among len raw values of dtype code. */
static uint32_t count_nonfinite(const char *src, int code, Py_ssize_t len) {
    uint32_t bad = 0;
    if (code == CODE_F32) {
        for (Py_ssize_t i = 0; i < len; i++) {
            uint32_t u;
            memcpy(&u, src + 4 * i, 4);
            bad += (u & F32_EXP) == F32_EXP;
        }
        return bad;
    }
    uint32_t exp = code == CODE_BF16 ? BF16_EXP : F16_EXP;
    const uint16_t *h = (const uint16_t *)src;
    for (Py_ssize_t i = 0; i < len; i++) bad += (h[i] & exp) == exp;
    return bad;
}

/* After a store: the non-finite values written (*bad) and, of those, the ones that were finite in
   float32 (*overflow: the cast rounded them to ±inf). */
static void count_output(const char *out, int code, const float *src, Py_ssize_t len, uint32_t *bad,
                         uint32_t *overflow) {
    uint32_t exp = code == CODE_F32 ? F32_EXP : code == CODE_BF16 ? BF16_EXP : F16_EXP;
    uint32_t nonfinite = 0, over = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        uint32_t o;
        if (code == CODE_F32)
            memcpy(&o, out + 4 * i, 4);
        else
            o = ((const uint16_t *)out)[i];
        uint32_t out_bad = (o & exp) == exp;
        nonfinite += out_bad;
        over += out_bad & ((f32_to_bits(src[i]) & F32_EXP) != F32_EXP);
    }
    *bad = nonfinite;
    *overflow = over;
}

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
    Py_ssize_t n_inputs;
    Py_ssize_t terms[MAX_INPUTS];
    float weight[MAX_INPUTS];
    int used[MAX_INPUTS];
    int has_weight[MAX_INPUTS];
    Py_ssize_t n_terms;
    Py_ssize_t subtract, anchor; /* -1: none */
    int has_divisor, has_scale, has_anchor_weight;
    float divisor, scale, anchor_weight;
    char *out;
    int out_code;
    Py_ssize_t n;
} Job;

typedef struct {
    uint64_t in[MAX_INPUTS]; /* NaN/±inf values read from each input */
    uint64_t out;            /* NaN/±inf values written */
    uint64_t overflow;       /* of those, finite before the cast */
} Counts;

static size_t itemsize(int code) { return code == CODE_F32 ? 4 : 2; }

/* Returns the largest magnitude stored (float32 bits). */
static uint32_t store(const Job *job, const float *acc, Py_ssize_t start, Py_ssize_t len) {
    if (job->out_code == CODE_F32) return store_f32((float *)job->out + start, acc, len);
    if (job->out_code == CODE_BF16) return store_bf16((uint16_t *)job->out + start, acc, len);
    store_f16((uint16_t *)job->out + start, acc, len);
    return max_magnitude(acc, len);
}

/* The smallest float32 magnitude (as bits) that casts to a non-finite value of the output dtype. */
static uint32_t nonfinite_from(int out_code) {
    if (out_code == CODE_BF16) return 0x7f7f8000u; /* rounds up to bf16 infinity */
    if (out_code == CODE_F16) return 0x477ff000u;  /* 65520: rounds up to fp16 infinity */
    return F32_EXP;
}

/* Count a block's NaN/±inf: in the inputs the form does not use (nothing vouches for them), and,
   when the result block casts to some non-finite value, in the used inputs and the output too. */
static void count_block(const Job *job, const float *acc, uint32_t top, Py_ssize_t start, Py_ssize_t len,
                        Counts *counts) {
    int suspect = top >= nonfinite_from(job->out_code);
    for (Py_ssize_t k = 0; k < job->n_inputs; k++)
        if (suspect || !job->used[k])
            counts->in[k] += count_nonfinite(job->in[k] + (size_t)start * itemsize(job->code[k]), job->code[k], len);
    if (suspect) {
        uint32_t bad, overflow;
        count_output(job->out + (size_t)start * itemsize(job->out_code), job->out_code, acc, len, &bad, &overflow);
        counts->out += bad;
        counts->overflow += overflow;
    }
}

/* Σⱼ wⱼ·(x[termⱼ] − x[subtract]) / divisor · scale + x[anchor]·anchor_weight, left to right, each step rounded.
   Every input of the task is counted, used or not, as on the torch path. */
static void run(const Job *job, float *x, float *acc, float *tmp, Counts *counts) {
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
        if (job->anchor >= 0 && job->has_anchor_weight) {
            mul_block(tmp, x + job->anchor * BLOCK, job->anchor_weight, len);
            acc_block(acc, tmp, len);
        } else if (job->anchor >= 0) {
            acc_block(acc, x + job->anchor * BLOCK, len);
        }
        count_block(job, acc, store(job, acc, start, len), start, len, counts);
    }
}

static int read_index(PyObject *seq, Py_ssize_t i, Py_ssize_t *out) {
    PyObject *item = PySequence_GetItem(seq, i);
    if (!item) return -1;
    *out = PyLong_AsSsize_t(item);
    Py_DECREF(item);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* ((non-finite values read, per input), non-finite values written, overflows on the cast) */
static PyObject *counts_tuple(const Counts *counts, Py_ssize_t n_inputs) {
    PyObject *per_input = PyTuple_New(n_inputs);
    if (!per_input) return NULL;
    for (Py_ssize_t k = 0; k < n_inputs; k++) {
        PyObject *v = PyLong_FromUnsignedLongLong(counts->in[k]);
        if (!v) {
            Py_DECREF(per_input);
            return NULL;
        }
        PyTuple_SET_ITEM(per_input, k, v);
    }
    return Py_BuildValue("(NKK)", per_input, (unsigned long long)counts->out, (unsigned long long)counts->overflow);
}

static PyObject *py_linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out_addr;
    int out_code;
    Py_ssize_t n, subtract, anchor;
    PyObject *inputs, *codes, *terms, *weights, *divisor, *scale, *anchor_weight;
    if (!PyArg_ParseTuple(args, "KinOOOOnOOnO", &out_addr, &out_code, &n, &inputs, &codes, &terms, &weights,
                          &subtract, &divisor, &scale, &anchor, &anchor_weight))
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
    if (divisor != Py_None) {
        job.has_divisor = 1;
        job.divisor = (float)PyFloat_AsDouble(divisor);
    }
    if (scale != Py_None) {
        job.has_scale = 1;
        job.scale = (float)PyFloat_AsDouble(scale);
    }
    if (anchor_weight != Py_None) {
        job.has_anchor_weight = 1;
        job.anchor_weight = (float)PyFloat_AsDouble(anchor_weight);
    }
    if (subtract >= 0) job.used[subtract] = 1;
    if (anchor >= 0) job.used[anchor] = 1;
    if (PyErr_Occurred()) return NULL;

    float *work = malloc(sizeof(float) * BLOCK * (size_t)(job.n_inputs + 2));
    Counts *counts = calloc(1, sizeof(Counts));
    if (!work || !counts) {
        free(work);
        free(counts);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS;
    run(&job, work, work + job.n_inputs * BLOCK, work + (job.n_inputs + 1) * BLOCK, counts);
    Py_END_ALLOW_THREADS;
    free(work);
    PyObject *result = counts_tuple(counts, job.n_inputs);
    free(counts);
    return result;
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
