/* Float formats shared by the native kernels (_native.c, kernels/gta.c): exact widenings of bf16 and
   fp16 to float32, and roundings of float32 to bf16/fp16 to nearest, ties to even, exactly as torch's
   CPU casts give them (NaNs included). Each kernel writes its own store loops around the roundings (the
   linear kernel's also track the largest magnitude). Everything is static: each extension gets its copy. */

#ifndef MERGEKITLITE_DTYPES_H
#define MERGEKITLITE_DTYPES_H

#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__)
#define MKL_MAYBE_UNUSED __attribute__((unused))
#else
#define MKL_MAYBE_UNUSED
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#define restrict __restrict /* MSVC's C mode spells C99's restrict this way */
#endif

enum { CODE_F32 = 0, CODE_BF16 = 1, CODE_F16 = 2 };

/* Several copies of the hot loops, one per instruction set, picked at load time (GCC/clang ifunc). */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__INTEL_COMPILER)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Exact widenings. */

MULTIVERSION MKL_MAYBE_UNUSED static void load_bf16(float *restrict dst, const uint16_t *restrict src, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) dst[i] = bits_to_f32((uint32_t)src[i] << 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 is exact in float32 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    if (exp == 31) /* inf, or NaN made quiet as the hardware conversion does */
        return bits_to_f32(sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0u));
    return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

MULTIVERSION MKL_MAYBE_UNUSED static void load_f16(float *restrict dst, const uint16_t *restrict src, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) dst[i] = f16_to_f32(src[i]);
}

/* Roundings to nearest, ties to even; NaN as torch's CPU casts give it (bf16: 0xffff; f16: sign,
   quiet bit and the top payload bits). */

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffu;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_to_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* ≥ 65520 rounds to infinity */
    if (a < 0x38800000u) {                                    /* below 2^-14: a subnormal or zero */
        /* |f|·2^24 < 1024 is exact, and nearbyintf rounds it to even in the default mode. */
        return (uint16_t)(sign | (uint32_t)nearbyintf(bits_to_f32(a) * 0x1p24f));
    }
    a += 0xfffu + ((a >> 13) & 1u); /* round the 13 dropped bits; a carry moves into the exponent */
    return (uint16_t)(sign | ((a - (112u << 23)) >> 13));
}


/* A block of raw values (code CODE_*) from element ``start``, widened to float32. */
MKL_MAYBE_UNUSED static void load(float *dst, const char *src, int code, Py_ssize_t start, Py_ssize_t len) {
    if (code == CODE_F32)
        memcpy(dst, src + start * 4, (size_t)len * 4);
    else if (code == CODE_BF16)
        load_bf16(dst, (const uint16_t *)src + start, len);
    else
        load_f16(dst, (const uint16_t *)src + start, len);
}


#endif
