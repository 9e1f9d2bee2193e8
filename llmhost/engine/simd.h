/* Vector code the C kernels share, included with quotes: engine/native.py hashes a kernel's
   quoted includes into its built library's cache key, so an edit here builds them anew. */
#ifndef LLMHOST_SIMD_H
#define LLMHOST_SIMD_H
#include <immintrin.h>
#include <stdint.h>

/* values i .. i + 7 of p as float32: p float32, or with `bf16` bfloat16 widened (exact: the bits
   shifted up) */
static inline __m256 load8(const void *p, int64_t i, int bf16) {
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm256_loadu_ps((const float *)p + i);
}

#ifdef __AVX512F__
/* values i .. i + 15 of p as float32 (load8's 16) */
static inline __m512 load16(const void *p, int64_t i, int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}

/* 16 x 16 floats transposed in registers: rows a[0..16) in, columns out (a[c] = column c) */
static inline void transpose16(__m512 a[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {   /* a[4i + e], 128-bit lane L: rows 4i .. 4i + 3 of column 4L + e */
        __m512d x0 = _mm512_castps_pd(t[4 * i]), x1 = _mm512_castps_pd(t[4 * i + 1]);
        __m512d x2 = _mm512_castps_pd(t[4 * i + 2]), x3 = _mm512_castps_pd(t[4 * i + 3]);
        a[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(x0, x2));
        a[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x0, x2));
        a[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(x1, x3));
        a[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(x1, x3));
    }
    for (int e = 0; e < 4; e++) {   /* the 4 x 4 lanes of a[e], a[4 + e], a[8 + e], a[12 + e] */
        __m512 v0 = _mm512_shuffle_f32x4(a[e], a[4 + e], 0x44), v1 = _mm512_shuffle_f32x4(a[8 + e], a[12 + e], 0x44);
        __m512 v2 = _mm512_shuffle_f32x4(a[e], a[4 + e], 0xEE), v3 = _mm512_shuffle_f32x4(a[8 + e], a[12 + e], 0xEE);
        t[e] = _mm512_shuffle_f32x4(v0, v1, 0x88);
        t[4 + e] = _mm512_shuffle_f32x4(v0, v1, 0xDD);
        t[8 + e] = _mm512_shuffle_f32x4(v2, v3, 0x88);
        t[12 + e] = _mm512_shuffle_f32x4(v2, v3, 0xDD);
    }
    for (int i = 0; i < 16; i++) a[i] = t[i];
}
#else
/* 8 x 8 floats transposed in registers: rows a[0..8) in, columns out (a[c] = column c) */
static inline void transpose8(__m256 a[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {   /* u[4i + e], 128-bit half H: rows 4i .. 4i + 3 of column 4H + e */
        __m256d x0 = _mm256_castps_pd(t[4 * i]), x1 = _mm256_castps_pd(t[4 * i + 1]);
        __m256d x2 = _mm256_castps_pd(t[4 * i + 2]), x3 = _mm256_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm256_castpd_ps(_mm256_unpacklo_pd(x0, x2));
        u[4 * i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(x0, x2));
        u[4 * i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(x1, x3));
        u[4 * i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(x1, x3));
    }
    for (int e = 0; e < 4; e++) {   /* columns e (low halves) and 4 + e (high halves) */
        a[e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x20);
        a[4 + e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x31);
    }
}
#endif

/* for (int64_t i = 0; i < n; i++) { body }: on the nt OpenMP threads (a variable nt in scope)
   where `split`, else on this thread without entering OpenMP: `omp parallel for ... if (0)`
   still makes a team of one, ~0.25 us, and a decode step's lone rows went through ~10 such a
   layer (thirty-first session) */
#define FOR_SPLIT(split, i, n, ...) do { \
        if (split) { \
            _Pragma("omp parallel for num_threads(nt) schedule(static)") \
            for (int64_t i = 0; i < (n); i++) { __VA_ARGS__ } \
        } else { \
            for (int64_t i = 0; i < (n); i++) { __VA_ARGS__ } \
        } \
    } while (0)

#endif
