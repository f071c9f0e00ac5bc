/* Native kernels for the generalized-task-arithmetic family (TIES, DARE, Breadcrumbs; their merge pass
   and their statistic passes), straight from the inputs' raw bf16/fp16/float32 bytes.

   The torch path (methods/sparsify.py) is the reference: every float32 operation here is the one it
   makes, in the same order, rounded once (no FMA contraction: see setup.py), so the output bits are
   the same. Per element, with δᵢ = mᵢ − b:

     maskᵢ      a top-k window of |δᵢ| keys (float32 bit patterns) against thresholds, the ties at a
                threshold kept in flat order up to a per-row allowance (TopK._mask), or DARE's
                splitmix64(key + index·γ) < bound·2¹¹ (bernoulli_mask); dropped entries become +0.0;
     δᵢ·scaleᵢ  the L1 rescale factor, when there is one; then ·wᵢ when wᵢ ≠ 1 (sparse_deltas);
     mix        Σ left to right (÷ Σw when normalizing), or the TIES consensus (agreement_masks: the vote
                is δ₀ + 0.0, δ₀ + δ₁, or the float64 left-to-right sum narrowed to float32; agreeing
                entries are summed left to right, ÷ their float32 weight sum, 0 → 1);
     ·λ when λ ≠ 1, + b, one rounding to the output format.

   A TIES vote that is not finite makes the torch path switch to another formula (_agreeing_mix): the
   kernel then stops and reports it, and the caller runs the torch path for that chunk.

   The statistic entry points count the keys of |δ| (histograms of their high and low 16 bits, per-row
   counts of keys equal to a threshold) and sum |δ| per row before and after masking by the float64
   pairwise tree of primitives.pairwise_sum. The GIL is released while any of them runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtypes.h"

#define ABI_VERSION 1
#define BLOCK 1024
#define MAX_MODELS 64
#define MAX_QUERIES 4

enum { MASK_ALL = 0, MASK_NONE = 1, MASK_TOPK = 2, MASK_RANDOM = 3 };
enum { Q_NONE = 0, Q_ALL = 1, Q_THRESHOLD = 2 }; /* what one top-k query keeps */
enum { STATUS_OK = 0, STATUS_FALLBACK = 1 };

#define GAMMA 0x9E3779B97F4A7C15ull
#define MIX1 0xBF58476D1CE4E5B9ull
#define MIX2 0x94D049BB133111EBull
#define EXP_BITS 0x7f800000u

/* One top-k query. Without per-row rules: keys ≥ ``threshold`` are kept. With them (a threshold that
   splits the keys equal to it): in chunk row r, keys > thr[r] are kept (thr[r] is threshold − 1 in the
   rows that keep all their ties, threshold in those that keep none), and where partial[r] ≥ 0 the first
   partial[r] keys equal to ``threshold`` of the row, in flat order, too. ``row``/``seen``: that count. */
typedef struct {
    int kind;
    int32_t threshold;
    const int32_t *thr;
    const int64_t *partial;
    Py_ssize_t row;
    int64_t seen;
} Query;

/* One model's mask (the top-k window keeps what ``a`` keeps and ``b`` does not), rescale and weight. */
typedef struct {
    int mask;
    Query a, b;
    uint64_t key, limit; /* random: keep where splitmix64(key + i·γ) < limit */
    int has_scale, has_weight;
    float scale, weight;
} Model;

/* ---------------------------------------------------------------- stores */

MULTIVERSION static void store_bf16(uint16_t *restrict dst, const float *restrict src, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) dst[i] = f32_to_bf16(src[i]);
}

MULTIVERSION static void store_f16(uint16_t *restrict dst, const float *restrict src, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) dst[i] = f32_to_f16(src[i]);
}

/* A block of float32 values rounded to the output format, at element ``start`` of ``dst``. */
static void store(char *dst, int code, Py_ssize_t start, const float *src, Py_ssize_t len) {
    if (code == CODE_F32)
        memcpy(dst + start * 4, src, (size_t)len * 4);
    else if (code == CODE_BF16)
        store_bf16((uint16_t *)dst + start, src, len);
    else
        store_f16((uint16_t *)dst + start, src, len);
}

/* ---------------------------------------------------------------- masks */

MULTIVERSION static void query_block(Query *q, const int32_t *restrict keys, int32_t *restrict keep, Py_ssize_t p0,
                                     Py_ssize_t len, Py_ssize_t row_len) {
    if (q->kind != Q_THRESHOLD) {
        int32_t v = q->kind == Q_ALL ? -1 : 0;
        for (Py_ssize_t i = 0; i < len; i++) keep[i] = v;
        return;
    }
    if (!q->thr) {
        const int32_t t = q->threshold;
        for (Py_ssize_t i = 0; i < len; i++) keep[i] = -(int32_t)(keys[i] >= t);
        return;
    }
    for (Py_ssize_t i = 0; i < len;) { /* one segment per chunk row */
        Py_ssize_t r = (p0 + i) / row_len, end = (r + 1) * row_len - p0;
        if (end > len) end = len;
        const int32_t t = q->thr[r];
        for (Py_ssize_t j = i; j < end; j++) keep[j] = -(int32_t)(keys[j] > t);
        if (q->partial[r] >= 0) {
            if (r != q->row) {
                q->row = r;
                q->seen = 0;
            }
            for (Py_ssize_t j = i; j < end; j++)
                if (keys[j] == q->threshold) keep[j] = -(int32_t)(q->seen++ < q->partial[r]);
        }
        i = end;
    }
}

static inline uint64_t splitmix(uint64_t z) {
    z = (z ^ (z >> 30)) * MIX1;
    z = (z ^ (z >> 27)) * MIX2;
    return z ^ (z >> 31);
}

/* keep[i] (all ones: keep) for the chunk's elements p0.. (chunk-relative; ``flat0``: the chunk's first
   flat index in the tensor), given their |δ| keys. ``scratch``: BLOCK int32. */
MULTIVERSION static void model_mask(Model *m, const int32_t *restrict keys, int32_t *restrict keep, int32_t *restrict scratch,
                       Py_ssize_t p0, Py_ssize_t len, Py_ssize_t row_len, uint64_t flat0) {
    if (m->mask == MASK_ALL || m->mask == MASK_NONE) {
        int32_t v = m->mask == MASK_ALL ? -1 : 0;
        for (Py_ssize_t i = 0; i < len; i++) keep[i] = v;
    } else if (m->mask == MASK_TOPK) {
        /* Both queries see every key: each counts its own ties in flat order. */
        query_block(&m->a, keys, keep, p0, len, row_len);
        query_block(&m->b, keys, scratch, p0, len, row_len);
        for (Py_ssize_t i = 0; i < len; i++) keep[i] &= ~scratch[i];
    } else {
        uint64_t z = m->key + GAMMA + (flat0 + (uint64_t)p0) * GAMMA;
        for (Py_ssize_t i = 0; i < len; i++, z += GAMMA) keep[i] = -(int32_t)(splitmix(z) < m->limit);
    }
}

MULTIVERSION static void abs_keys(const float *restrict d, int32_t *restrict keys, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) keys[i] = (int32_t)(f32_to_bits(d[i]) & 0x7fffffffu);
}

/* ---------------------------------------------------------------- the merge pass */

typedef struct {
    const char *in[MAX_MODELS + 1]; /* the base first */
    int code[MAX_MODELS + 1];
    Py_ssize_t n_models;
    Model model[MAX_MODELS];
    int consensus, normalize_agreeing, has_divisor, has_lambda;
    float divisor, lambda;
    float agree_weight[MAX_MODELS];
    char *out;
    int out_code;
    Py_ssize_t n, row_len;
    uint64_t flat0;
    Py_ssize_t nonfinite_in[MAX_MODELS + 1]; /* per input: NaN/±inf read */
    Py_ssize_t nonfinite_out, overflow;     /* NaN/±inf written; of those, finite before the cast */
} MergeJob;

MULTIVERSION static Py_ssize_t count_nonfinite(const float *x, Py_ssize_t len) {
    Py_ssize_t c = 0;
    for (Py_ssize_t i = 0; i < len; i++) c += (f32_to_bits(x[i]) & EXP_BITS) == EXP_BITS;
    return c;
}

MULTIVERSION static Py_ssize_t count_nonfinite_out(const char *out, int code, Py_ssize_t start, Py_ssize_t len) {
    Py_ssize_t c = 0;
    if (code == CODE_F32) return count_nonfinite((const float *)out + start, len);
    const uint16_t *h = (const uint16_t *)out + start;
    uint16_t e = code == CODE_BF16 ? 0x7f80u : 0x7c00u;
    for (Py_ssize_t i = 0; i < len; i++) c += (h[i] & e) == e;
    return c;
}

/* δᵢ of model i over a block: masked, rescaled and weighted, in ``d``. */
MULTIVERSION static void model_block(MergeJob *job, Py_ssize_t i, const float *restrict base, float *restrict d,
                        int32_t *restrict keys, int32_t *restrict keep, int32_t *restrict scratch, Py_ssize_t start,
                        Py_ssize_t len) {
    Model *m = &job->model[i];
    load(d, job->in[i + 1], job->code[i + 1], start, len);
    job->nonfinite_in[i + 1] += count_nonfinite(d, len);
    for (Py_ssize_t j = 0; j < len; j++) d[j] = d[j] - base[j];
    if (m->mask != MASK_ALL) {
        abs_keys(d, keys, len);
        model_mask(m, keys, keep, scratch, start, len, job->row_len, job->flat0);
        uint32_t *bits = (uint32_t *)d;
        for (Py_ssize_t j = 0; j < len; j++) bits[j] &= (uint32_t)keep[j];
    }
    if (m->has_scale)
        for (Py_ssize_t j = 0; j < len; j++) d[j] = d[j] * m->scale;
    if (m->has_weight)
        for (Py_ssize_t j = 0; j < len; j++) d[j] = d[j] * m->weight;
}

/* The TIES mix of a block into ``acc``; 0 when some vote is not finite (nothing is then guaranteed).
   ``vote``, ``sign``, ``wsum``: BLOCK floats; ``wide``: BLOCK doubles (three or more models). */
MULTIVERSION static int consensus_block(const MergeJob *job, float *const *d, float *restrict acc,
                                        float *restrict vote, float *restrict sign, float *restrict wsum,
                                        double *restrict wide, Py_ssize_t len) {
    Py_ssize_t n = job->n_models;
    if (n == 1)
        for (Py_ssize_t j = 0; j < len; j++) vote[j] = d[0][j] + 0.0f;
    else if (n == 2)
        for (Py_ssize_t j = 0; j < len; j++) vote[j] = d[0][j] + d[1][j];
    else {
        for (Py_ssize_t j = 0; j < len; j++) wide[j] = (double)d[0][j];
        for (Py_ssize_t i = 1; i < n; i++)
            for (Py_ssize_t j = 0; j < len; j++) wide[j] = wide[j] + (double)d[i][j];
        for (Py_ssize_t j = 0; j < len; j++) vote[j] = (float)wide[j];
    }
    uint32_t bad = 0;
    for (Py_ssize_t j = 0; j < len; j++) {
        uint32_t u = f32_to_bits(vote[j]);
        bad |= (u & EXP_BITS) == EXP_BITS;
        /* the elected sign as ±1.0: + for a zero vote (−0.0 + 0.0 = +0.0) */
        sign[j] = bits_to_f32((f32_to_bits(vote[j] + 0.0f) & 0x80000000u) | 0x3f800000u);
    }
    if (bad) return 0;
    /* δ agrees where δ·sign > 0 (zeros never do); the rest count as +0.0, in the sum and in the weights. */
    const float w0 = job->agree_weight[0];
    for (Py_ssize_t j = 0; j < len; j++) {
        int agree = d[0][j] * sign[j] > 0.0f;
        acc[j] = agree ? d[0][j] : 0.0f;
        wsum[j] = agree ? w0 : 0.0f;
    }
    for (Py_ssize_t i = 1; i < n; i++) {
        const float *restrict di = d[i];
        const float wi = job->agree_weight[i];
        for (Py_ssize_t j = 0; j < len; j++) {
            int agree = di[j] * sign[j] > 0.0f;
            acc[j] = acc[j] + (agree ? di[j] : 0.0f);
            wsum[j] = wsum[j] + (agree ? wi : 0.0f);
        }
    }
    if (job->normalize_agreeing)
        for (Py_ssize_t j = 0; j < len; j++) {
            float w = wsum[j] + 0.0f;
            acc[j] = acc[j] / (w == 0.0f ? 1.0f : w); /* no agreeing weight (or a sum of ±0): ÷ 1 */
        }
    return 1;
}

#define MERGE_WORK_BLOCKS 10 /* BLOCK-sized float arrays besides one per model (a double array is two) */

MULTIVERSION static int run_merge(MergeJob *job, float *work) {
    float *base = work, *acc = work + BLOCK, *wsum = work + 2 * BLOCK, *vote = work + 3 * BLOCK;
    float *sign = work + 4 * BLOCK;
    int32_t *keys = (int32_t *)(work + 5 * BLOCK), *keep = keys + BLOCK, *scratch = keep + BLOCK;
    double *wide = (double *)(work + 8 * BLOCK);
    float *d[MAX_MODELS];
    for (Py_ssize_t i = 0; i < job->n_models; i++) d[i] = work + (MERGE_WORK_BLOCKS + i) * BLOCK;
    for (Py_ssize_t start = 0; start < job->n; start += BLOCK) {
        Py_ssize_t len = job->n - start < BLOCK ? job->n - start : BLOCK;
        load(base, job->in[0], job->code[0], start, len);
        job->nonfinite_in[0] += count_nonfinite(base, len);
        for (Py_ssize_t i = 0; i < job->n_models; i++) model_block(job, i, base, d[i], keys, keep, scratch, start, len);
        if (job->consensus) {
            if (!consensus_block(job, d, acc, vote, sign, wsum, wide, len)) return STATUS_FALLBACK;
        } else {
            memcpy(acc, d[0], (size_t)len * 4);
            for (Py_ssize_t i = 1; i < job->n_models; i++)
                for (Py_ssize_t j = 0; j < len; j++) acc[j] = acc[j] + d[i][j];
            if (job->has_divisor)
                for (Py_ssize_t j = 0; j < len; j++) acc[j] = acc[j] / job->divisor;
        }
        if (job->has_lambda)
            for (Py_ssize_t j = 0; j < len; j++) acc[j] = acc[j] * job->lambda;
        for (Py_ssize_t j = 0; j < len; j++) acc[j] = acc[j] + base[j];
        Py_ssize_t before = count_nonfinite(acc, len);
        store(job->out, job->out_code, start, acc, len);
        Py_ssize_t after = count_nonfinite_out(job->out, job->out_code, start, len);
        job->nonfinite_out += after;
        job->overflow += after - before; /* a cast never makes a non-finite value finite */
    }
    return STATUS_OK;
}

/* ---------------------------------------------------------------- argument parsing */

static int read_float(PyObject *obj, int *has, float *value) {
    *has = obj != Py_None;
    if (*has) *value = (float)PyFloat_AsDouble(obj); /* rounded to float32, as torch rounds a scalar */
    return PyErr_Occurred() ? -1 : 0;
}

static int parse_query(PyObject *spec, Query *q) {
    unsigned long long thr, partial;
    if (!PyArg_ParseTuple(spec, "iiKK", &q->kind, &q->threshold, &thr, &partial)) return -1;
    if (q->kind < Q_NONE || q->kind > Q_THRESHOLD || q->threshold < 0 || (!thr) != (!partial)) {
        PyErr_SetString(PyExc_ValueError, "gta: bad top-k query");
        return -1;
    }
    q->thr = (const int32_t *)(uintptr_t)thr;
    q->partial = (const int64_t *)(uintptr_t)partial;
    q->row = -1;
    q->seen = 0;
    return 0;
}

/* (mask, (kind, threshold, thr, partial) × 2, key, limit, scale|None, weight|None) */
static int parse_model(PyObject *spec, Model *m) {
    PyObject *a, *b;
    unsigned long long key, limit;
    PyObject *scale, *weight;
    if (!PyArg_ParseTuple(spec, "iOOKKOO", &m->mask, &a, &b, &key, &limit, &scale, &weight)) return -1;
    if (m->mask < MASK_ALL || m->mask > MASK_RANDOM) {
        PyErr_SetString(PyExc_ValueError, "gta: unknown mask kind");
        return -1;
    }
    if (parse_query(a, &m->a) || parse_query(b, &m->b)) return -1;
    m->key = key;
    m->limit = limit;
    if (read_float(scale, &m->has_scale, &m->scale) || read_float(weight, &m->has_weight, &m->weight)) return -1;
    return 0;
}

static int parse_code(PyObject *seq, Py_ssize_t i, int *code) {
    PyObject *item = PySequence_GetItem(seq, i);
    if (!item) return -1;
    long v = PyLong_AsLong(item);
    Py_DECREF(item);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < CODE_F32 || v > CODE_F16) {
        PyErr_SetString(PyExc_ValueError, "gta: unknown dtype code");
        return -1;
    }
    *code = (int)v;
    return 0;
}

static int parse_addr(PyObject *seq, Py_ssize_t i, const char **addr) {
    PyObject *item = PySequence_GetItem(seq, i);
    if (!item) return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(item);
    Py_DECREF(item);
    if (PyErr_Occurred()) return -1;
    *addr = (const char *)(uintptr_t)v;
    return 0;
}

/* merge(out, out_code, n, row_len, flat0, inputs, codes, models, agree_weights, consensus,
         normalize_agreeing, divisor|None, lambda|None) -> (status, NaN/±inf read per input, NaN/±inf written,
         of those finite before the cast); the counts are meaningless when status is STATUS_FALLBACK */
static PyObject *py_merge(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out_addr, flat0;
    int out_code, consensus, normalize_agreeing;
    Py_ssize_t n, row_len;
    PyObject *inputs, *codes, *models, *agree, *divisor, *lambda;
    if (!PyArg_ParseTuple(args, "KinnKOOOOiiOO", &out_addr, &out_code, &n, &row_len, &flat0, &inputs, &codes, &models,
                          &agree, &consensus, &normalize_agreeing, &divisor, &lambda))
        return NULL;
    MergeJob *job = calloc(1, sizeof *job);
    if (!job) return PyErr_NoMemory();
    job->n_models = PySequence_Size(models);
    Py_ssize_t n_inputs = PySequence_Size(inputs);
    if (job->n_models < 1 || job->n_models > MAX_MODELS || n_inputs != job->n_models + 1 ||
        PySequence_Size(codes) != n_inputs || PySequence_Size(agree) != job->n_models || n < 0 || row_len < 1 ||
        out_code < CODE_F32 || out_code > CODE_F16) {
        free(job);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "gta.merge: inconsistent arguments");
        return NULL;
    }
    job->out = (char *)(uintptr_t)out_addr;
    job->out_code = out_code;
    job->n = n;
    job->row_len = row_len;
    job->flat0 = flat0;
    job->consensus = consensus;
    job->normalize_agreeing = normalize_agreeing;
    int failed = read_float(divisor, &job->has_divisor, &job->divisor) ||
                 read_float(lambda, &job->has_lambda, &job->lambda);
    for (Py_ssize_t k = 0; !failed && k < n_inputs; k++)
        failed = parse_addr(inputs, k, &job->in[k]) || parse_code(codes, k, &job->code[k]);
    for (Py_ssize_t i = 0; !failed && i < job->n_models; i++) {
        PyObject *spec = PySequence_GetItem(models, i), *w = PySequence_GetItem(agree, i);
        failed = !spec || !w || parse_model(spec, &job->model[i]);
        if (!failed) {
            job->agree_weight[i] = (float)PyFloat_AsDouble(w);
            failed = PyErr_Occurred() != NULL;
        }
        Py_XDECREF(spec);
        Py_XDECREF(w);
    }
    float *work = failed ? NULL : malloc(sizeof(float) * BLOCK * (size_t)(MERGE_WORK_BLOCKS + job->n_models));
    if (failed || !work) {
        free(job);
        return failed ? NULL : PyErr_NoMemory();
    }
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = run_merge(job, work);
    Py_END_ALLOW_THREADS;
    PyObject *found = PyTuple_New(n_inputs), *result = NULL;
    for (Py_ssize_t k = 0; found && k < n_inputs; k++) {
        PyObject *v = PyLong_FromSsize_t(job->nonfinite_in[k]);
        if (!v) {
            Py_CLEAR(found);
            break;
        }
        PyTuple_SET_ITEM(found, k, v);
    }
    if (found) result = Py_BuildValue("(iNnn)", status, found, job->nonfinite_out, job->overflow);
    free(work);
    free(job);
    return result;
}

/* ---------------------------------------------------------------- statistic passes */

typedef struct {
    const char *base, *model;
    int base_code, model_code;
} Delta;

/* |δ| keys (and, with ``mag``, |δ| itself) of elements start..start+len of the chunk. */
MULTIVERSION static void delta_keys(const Delta *dl, float *restrict b, float *restrict mag, int32_t *restrict keys,
                       Py_ssize_t start, Py_ssize_t len) {
    load(b, dl->base, dl->base_code, start, len);
    load(mag, dl->model, dl->model_code, start, len);
    for (Py_ssize_t j = 0; j < len; j++) mag[j] = fabsf(mag[j] - b[j]);
    abs_keys(mag, keys, len);
}

static int parse_delta(PyObject *args, Delta *dl) {
    unsigned long long base, model;
    if (!PyArg_ParseTuple(args, "KiKi", &base, &dl->base_code, &model, &dl->model_code)) return -1;
    if (dl->base_code < CODE_F32 || dl->base_code > CODE_F16 || dl->model_code < CODE_F32 ||
        dl->model_code > CODE_F16) {
        PyErr_SetString(PyExc_ValueError, "gta: unknown dtype code");
        return -1;
    }
    dl->base = (const char *)(uintptr_t)base;
    dl->model = (const char *)(uintptr_t)model;
    return 0;
}

typedef struct {
    Delta dl;
    Py_ssize_t n, row_len;
    int mode;
    Py_ssize_t count;
    int64_t value[MAX_QUERIES];
    int64_t *out[MAX_QUERIES];
    /* mode 1, optional: per chunk row, up to RECORD_SLOTS distinct low halves of the keys in the bin and
       their counts (low −1: a free slot), so that the tie counts at the threshold need no pass of their own */
    int32_t *rec_low[MAX_QUERIES];
    int64_t *rec_count[MAX_QUERIES];
    int overflow; /* some row had more distinct low halves in the bin than slots */
} CountJob;

#define RECORD_SLOTS 8

static void record(CountJob *job, Py_ssize_t q, Py_ssize_t row, int32_t low) {
    int32_t *lows = job->rec_low[q] + row * RECORD_SLOTS;
    int64_t *counts = job->rec_count[q] + row * RECORD_SLOTS;
    for (int s = 0; s < RECORD_SLOTS; s++) {
        if (lows[s] == low) {
            counts[s]++;
            return;
        }
        if (lows[s] < 0) {
            lows[s] = low;
            counts[s] = 1;
            return;
        }
    }
    job->overflow = 1;
}

/* Returns how many |δ| are NaN: their keys depend on NaN payloads, which the C and torch conversions and
   subtractions do not propagate alike, so the caller leaves such chunks to the torch path. */
MULTIVERSION static Py_ssize_t run_counts(CountJob *job, float *b, float *mag, int32_t *keys) {
    Py_ssize_t nan = 0;
    for (Py_ssize_t start = 0; start < job->n; start += BLOCK) {
        Py_ssize_t len = job->n - start < BLOCK ? job->n - start : BLOCK;
        delta_keys(&job->dl, b, mag, keys, start, len);
        for (Py_ssize_t j = 0; j < len; j++) nan += keys[j] > (int32_t)EXP_BITS;
        if (job->mode == 0) {
            int64_t *h = job->out[0];
            for (Py_ssize_t j = 0; j < len; j++) h[(uint32_t)keys[j] >> 16]++;
        } else if (job->mode == 1) {
            for (Py_ssize_t q = 0; q < job->count; q++) {
                int64_t *h = job->out[q];
                int32_t high = (int32_t)job->value[q];
                if (job->rec_low[q]) {
                    for (Py_ssize_t j = 0; j < len; j++)
                        if ((keys[j] >> 16) == high) {
                            h[keys[j] & 0xffff]++;
                            record(job, q, (start + j) / job->row_len, keys[j] & 0xffff);
                        }
                } else
                    for (Py_ssize_t j = 0; j < len; j++)
                        if ((keys[j] >> 16) == high) h[keys[j] & 0xffff]++;
            }
        } else {
            for (Py_ssize_t q = 0; q < job->count; q++) {
                int64_t *rows = job->out[q];
                int32_t t = (int32_t)job->value[q];
                for (Py_ssize_t j = 0; j < len; j++)
                    if (keys[j] == t) rows[(start + j) / job->row_len]++;
            }
        }
    }
    return nan;
}

/* counts(delta, n, row_len, mode, values, outputs[, records]) -> (NaN |δ| seen, overflow): mode 0 "high"
   (values: [], outputs: [hist]), 1 "low" (values: high bits per query, outputs: a 65536-bin histogram each;
   records: per query None or (int32 lows, int64 counts), RECORD_SLOTS per chunk row), 2 "ties" (values:
   thresholds, outputs: an int64 count per chunk row each). Counts are added to the outputs. */
static PyObject *py_counts(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *delta, *values, *outputs, *records = Py_None;
    CountJob job;
    memset(&job, 0, sizeof job);
    if (!PyArg_ParseTuple(args, "OnniOO|O", &delta, &job.n, &job.row_len, &job.mode, &values, &outputs, &records))
        return NULL;
    if (parse_delta(delta, &job.dl)) return NULL;
    job.count = PySequence_Size(outputs);
    if (job.count < 1 || job.count > MAX_QUERIES || job.mode < 0 || job.mode > 2 || job.row_len < 1 || job.n < 0 ||
        (job.mode == 0 ? job.count != 1 : PySequence_Size(values) != job.count)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "gta.counts: inconsistent arguments");
        return NULL;
    }
    for (Py_ssize_t q = 0; q < job.count; q++) {
        const char *addr;
        if (parse_addr(outputs, q, &addr)) return NULL;
        job.out[q] = (int64_t *)addr;
        if (job.mode != 0) {
            PyObject *item = PySequence_GetItem(values, q);
            if (!item) return NULL;
            job.value[q] = PyLong_AsLongLong(item);
            Py_DECREF(item);
            if (PyErr_Occurred()) return NULL;
        }
        if (job.mode == 1 && records != Py_None) {
            PyObject *item = PySequence_GetItem(records, q);
            unsigned long long lows = 0, counts = 0;
            int ok = item && (item == Py_None || PyArg_ParseTuple(item, "KK", &lows, &counts));
            Py_XDECREF(item);
            if (!ok) return NULL;
            job.rec_low[q] = (int32_t *)(uintptr_t)lows;
            job.rec_count[q] = (int64_t *)(uintptr_t)counts;
        }
    }
    float *work = malloc(sizeof(float) * BLOCK * 3);
    if (!work) return PyErr_NoMemory();
    Py_ssize_t nan;
    Py_BEGIN_ALLOW_THREADS;
    nan = run_counts(&job, work, work + BLOCK, (int32_t *)(work + 2 * BLOCK));
    Py_END_ALLOW_THREADS;
    free(work);
    return Py_BuildValue("ni", nan, job.overflow);
}

/* primitives.pairwise_sum of one row whose ``width`` leading terms are in acc[0..width) (the rest already
   folded in): the padding's zeros, then halving. ``n``: the row's length (≥ 2). */
MULTIVERSION static double pairwise_tail(double *acc, Py_ssize_t n, Py_ssize_t half) {
    for (Py_ssize_t j = n - half; j < half; j++) acc[j] = acc[j] + 0.0; /* −0.0 → +0.0, as the padded tree */
    for (Py_ssize_t width = half; width > 1;) {
        width /= 2;
        for (Py_ssize_t j = 0; j < width; j++) acc[j] = acc[j] + acc[j + width];
    }
    return acc[0];
}

typedef struct {
    Delta dl;
    Model model;
    Py_ssize_t rows, row_len;
    uint64_t flat0;
    double *before, *after;
} L1Job;

/* Per row: Σ|δ| and Σ|δ|·keep (keep as 1.0/0.0 multiplied in float32), each by pairwise_sum's tree. */
MULTIVERSION static void run_l1(L1Job *job, float *b, float *mag, float *kept, int32_t *keys, int32_t *keep, int32_t *scratch,
                   double *acc_b, double *acc_a) {
    Py_ssize_t n = job->row_len;
    Py_ssize_t half = 1;
    while (half * 2 < n) half *= 2; /* the largest power of two below n (n ≥ 2) */
    for (Py_ssize_t r = 0; r < job->rows; r++) {
        for (Py_ssize_t j0 = 0; j0 < n; j0 += BLOCK) {
            Py_ssize_t len = n - j0 < BLOCK ? n - j0 : BLOCK, start = r * n + j0;
            delta_keys(&job->dl, b, mag, keys, start, len);
            model_mask(&job->model, keys, keep, scratch, start, len, n, job->flat0);
            for (Py_ssize_t j = 0; j < len; j++) kept[j] = mag[j] * (keep[j] ? 1.0f : 0.0f);
            if (n == 1) {
                job->before[r] = (double)mag[0];
                job->after[r] = (double)kept[0];
                continue;
            }
            /* The first level of the tree: positions below ``half`` start their pair, the rest join it. */
            Py_ssize_t low = j0 < half ? (half - j0 < len ? half - j0 : len) : 0;
            for (Py_ssize_t j = 0; j < low; j++) {
                acc_b[j0 + j] = (double)mag[j];
                acc_a[j0 + j] = (double)kept[j];
            }
            if (low < len) {
                double *restrict hb = acc_b + (j0 + low - half), *restrict ha = acc_a + (j0 + low - half);
                for (Py_ssize_t j = low; j < len; j++) {
                    hb[j - low] = hb[j - low] + (double)mag[j];
                    ha[j - low] = ha[j - low] + (double)kept[j];
                }
            }
        }
        if (n > 1) {
            job->before[r] = pairwise_tail(acc_b, n, half);
            job->after[r] = pairwise_tail(acc_a, n, half);
        }
    }
}

/* row_l1(delta, rows, row_len, flat0, model, before, after) -> None: per chunk row, float64 Σ|δ| into
   before[r] and Σ|δ|·mask into after[r] (model: the tuple of merge's models). */
static PyObject *py_row_l1(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *delta, *model;
    unsigned long long before, after;
    L1Job job;
    memset(&job, 0, sizeof job);
    if (!PyArg_ParseTuple(args, "OnnKOKK", &delta, &job.rows, &job.row_len, &job.flat0, &model, &before, &after))
        return NULL;
    if (parse_delta(delta, &job.dl) || parse_model(model, &job.model)) return NULL;
    if (job.rows < 0 || job.row_len < 1) {
        PyErr_SetString(PyExc_ValueError, "gta.row_l1: inconsistent arguments");
        return NULL;
    }
    job.before = (double *)(uintptr_t)before;
    job.after = (double *)(uintptr_t)after;
    Py_ssize_t half = 1;
    while (half * 2 < job.row_len) half *= 2;
    float *work = malloc(sizeof(float) * BLOCK * 6 + sizeof(double) * 2 * (size_t)half);
    if (!work) return PyErr_NoMemory();
    double *acc = (double *)(work + BLOCK * 6);
    Py_BEGIN_ALLOW_THREADS;
    run_l1(&job, work, work + BLOCK, work + 2 * BLOCK, (int32_t *)(work + 3 * BLOCK), (int32_t *)(work + 4 * BLOCK),
           (int32_t *)(work + 5 * BLOCK), acc, acc + half);
    Py_END_ALLOW_THREADS;
    free(work);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"merge", py_merge, METH_VARARGS, "The family's merge pass over raw input buffers (see methods/native_gta.py)."},
    {"counts", py_counts, METH_VARARGS, "Top-k key counts of |δ| over raw input buffers."},
    {"row_l1", py_row_l1, METH_VARARGS, "Per-row L1 norms of |δ| before and after masking."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gta", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gta(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "ABI_VERSION", ABI_VERSION) < 0 ||
              PyModule_AddIntConstant(m, "RECORD_SLOTS", RECORD_SLOTS) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
