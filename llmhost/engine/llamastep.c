/* LlamaStep's decoder layers in one call (engine/llamastep.py says when): the operations
 * between the int4 kernel's products (models/q4kernel.c, q_linear) and the attention
 * (attention.c, attend), which this file calls through the pointers it is given.
 *
 * Why: on a small model those operations are most of a decode step that is not arithmetic.
 * SmolLM2 int4, one row, two cores: 6.3-6.6 ms a step, of which the kernel took 2.9 and the
 * attention 0.5; the rest was about 40 torch operations and their Python per layer (RMS norms,
 * the rotary embedding, the cache's writes, SiLU, the residual additions), each a few
 * microseconds whatever its size. Here they are loops over a few thousand numbers.
 *
 * Each operation computes what transformers' Llama layer computes with torch, rounded where
 * torch rounds (each bfloat16 operation's result to bfloat16, round to nearest even; compiled
 * with -ffp-contract=off, so no multiply-add is fused that torch does not fuse), with two
 * differences in the last bits: a norm's sum of squares runs in this file's order, and SiLU's
 * exponential is this file's polynomial. Every row is computed alone (nothing depends on the
 * other rows, the batch or the threads), which the prefix cache's reuse of any prefix needs
 * (llamastep.py's rows_alone): every forward of such a model runs here, prefill and decode.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

typedef int (*linear_fn)(int bits, const void *x, int bf16, int64_t m, int64_t k, const void *qs,
                         const uint16_t *d, const uint16_t *mn, int64_t n, void *out, int nt);
typedef int (*attend_fn)(int bf16, const void *q, const void *k, const void *v, const int64_t *st,
                         int64_t batch, int64_t heads, int64_t kv_heads, int64_t length,
                         int64_t keys, int64_t dim, const uint8_t *mask, float scale, void *out,
                         int nt);

/* one projection (or a group reading one input: q/k/v, gate/up) as q_linear takes it */
struct proj {
    int64_t bits, n;
    const void *qs;
    const uint16_t *d, *m;
};

/* one decoder layer: its norms' weights (the model's dtype), projections and cache buffers
   (keys / values [batch, kv_heads, positions, dim], element strides of the first three) */
struct layer {
    const void *norm1, *norm2;
    double eps1, eps2;
    struct proj qkv, o, gate_up, down;
    void *keys, *values;
    int64_t kst[3], vst[3];
};

/* 8 numbers of the model's dtype as float32 (simd.h's load8), and back (bfloat16: round to
   nearest even, a NaN stays a NaN, as torch's .to(bfloat16)) */
static inline __m256i bf16_bits(__m256 v) {   /* the rounded bfloat16 in each lane's high half */
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    return _mm256_and_si256(_mm256_blendv_epi8(r, quiet, nan), _mm256_set1_epi32((int)0xffff0000u));
}

/* a float32 result as the model's dtype holds it (bfloat16: rounded; float32: as it is) */
static inline __m256 held(__m256 v, int bf16) {
    return bf16 ? _mm256_castsi256_ps(bf16_bits(v)) : v;
}

static inline void store8(void *p, int64_t i, __m256 v, int bf16) {
    if (bf16) {
        __m256i u = _mm256_srli_epi32(bf16_bits(v), 16);
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), packed);
    } else {
        _mm256_storeu_ps((float *)p + i, v);
    }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x, 8 lanes: Cephes' expf polynomial (about 1 ulp), for SiLU */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                              _mm256_set1_ps(0.5f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(x, x)), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#ifdef __AVX512F__
/* The element-wise steps (SiLU, the residual additions) 16 lanes at a time where the CPU has
   AVX-512 (llamastep.py compiles with it there): load8, bf16_bits, held, store8 and exp8 at twice
   the width, the same operation on each lane, so the same bits (a 128-token prefill of
   SmolLM2 int4 66 -> 60 ms, seventeenth session). */
static inline __m512i bf16_bits16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
}

static inline __m512 held16(__m512 v, int bf16) {
    return bf16 ? _mm512_castsi512_ps(bf16_bits16(v)) : v;
}

static inline void store16(void *p, int64_t i, __m512 v, int bf16) {
    if (bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits16(v), 16)));
    else
        _mm512_storeu_ps((float *)p + i, v);
}

static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    __m512 fx = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                                   _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_sub_ps(x, _mm512_mul_ps(fx, _mm512_set1_ps(0.693359375f)));
    x = _mm512_sub_ps(x, _mm512_mul_ps(fx, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_add_ps(_mm512_mul_ps(y, _mm512_mul_ps(x, x)), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    /* y * 2^fx by one vscalefps: the same single rounding of the same product as exp8's multiply
       by 2^fx built from its bits (fx in -126 .. 127: 2^fx normal, the product finite) */
    return _mm512_scalef_ps(y, fx);
}
#endif

/* rows x numbers from which an element-wise step runs on both threads: SiLU's since the
   twentieth session (a 40-token prompt's, 61,440 a layer, ran on one thread while the other
   spun: 2.5% of its prefill), the norms, residual additions and rotation too since the
   thirty-fourth (one thread up to 65,536 before: with them on both and each residual addition
   joined with the norm after it, SmolLM2's 16- and 40-token prefills ran 1.06x and 1.03-1.04x
   as fast, 128 tokens 1.0x, the same logits; in-process A/B, docs/performance.md) */
#define SPLIT_FROM 8192

/* out = LlamaRMSNorm(h) for one row of n: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype) */
static void rms_row(const void *h, const void *w, double eps, int64_t n, void *out, int bf16) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
        __m256 x = load8(h, j, bf16);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, x));
    }
    float var = hsum8(acc) / (float)n;
    __m256 r = _mm256_set1_ps(1.0f / sqrtf(var + (float)eps));
    for (int64_t j = 0; j < n; j += 8) {
        __m256 x = held(_mm256_mul_ps(load8(h, j, bf16), r), bf16);
        store8(out, j, _mm256_mul_ps(load8(w, j, bf16), x), bf16);
    }
}

/* h [i, i + n) = (h + o).to(dtype), in place: a row's residual addition */
static void add_row(void *h, const void *o, int64_t i, int64_t n, int bf16) {
    int64_t end = i + n;
#ifdef __AVX512F__
    for (; i + 16 <= end; i += 16)
        store16(h, i, _mm512_add_ps(load16(h, i, bf16), load16(o, i, bf16)), bf16);
#endif
    for (; i < end; i += 8)
        store8(h, i, _mm256_add_ps(load8(h, i, bf16), load8(o, i, bf16)), bf16);
}

/* h [rows, n] = (h + o).to(dtype), in place (a residual addition), then where `norm` is given
   x [rows, n] = the norm of h's row (rms_row): each row's two steps together, on both threads
   from SPLIT_FROM numbers */
static void add_rows(void *h, const void *o, int64_t rows, int64_t n, int bf16, const void *norm, double eps,
                     void *x, int nt) {
    const int64_t size = bf16 ? 2 : 4;
    FOR_SPLIT(rows * n >= SPLIT_FROM, r, rows,
              add_row(h, o, r * n, n, bf16);
              if (norm) rms_row((char *)h + r * n * size, norm, eps, n, (char *)x + r * n * size, bf16););
}

/* transformers' apply_rotary_pos_emb on one head of `dim` in place:
   t * cos + rotate_half(t) * sin, as llamastep.py writes it (t.roll(half) * sin', where sin'
   is sin with its first half negated: the same bits) */
static void rope_head(void *t, const void *c, const void *s, int64_t dim, int bf16) {
    float keep[256];
    int64_t half = dim / 2;
#ifdef __AVX512F__
    if (half % 16 == 0) {   /* 16 lanes: the same operations on each */
        for (int64_t j = 0; j < dim; j += 16) _mm512_storeu_ps(keep + j, load16(t, j, bf16));
        for (int64_t j = 0; j < dim; j += 16) {
            __m512 a = held16(_mm512_mul_ps(_mm512_loadu_ps(keep + j), load16(c, j, bf16)), bf16);
            __m512 b = held16(_mm512_mul_ps(_mm512_loadu_ps(keep + (j + half) % dim), load16(s, j, bf16)), bf16);
            store16(t, j, _mm512_add_ps(a, b), bf16);
        }
        return;
    }
#endif
    for (int64_t j = 0; j < dim; j += 8) _mm256_storeu_ps(keep + j, load8(t, j, bf16));
    for (int64_t j = 0; j < dim; j += 8) {
        __m256 a = held(_mm256_mul_ps(_mm256_loadu_ps(keep + j), load8(c, j, bf16)), bf16);
        __m256 b = held(_mm256_mul_ps(_mm256_loadu_ps(keep + (j + half) % dim), load8(s, j, bf16)), bf16);
        store8(t, j, _mm256_add_ps(a, b), bf16);
    }
}

/* act = silu(gate) * up for one row: gu [gate (n) | up (n)] */
static void silu_mul_row(const void *gu, int64_t n, void *act, int bf16) {
    int64_t j = 0;
#ifdef __AVX512F__
    for (; j + 16 <= n; j += 16) {
        __m512 g = load16(gu, j, bf16);
        __m512 a = held16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                         exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))), bf16);
        store16(act, j, _mm512_mul_ps(a, load16(gu, n + j, bf16)), bf16);
    }
#endif
    for (; j < n; j += 8) {
        __m256 g = load8(gu, j, bf16);
        __m256 a = held(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f),
                                                       exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))), bf16);
        store8(act, j, _mm256_mul_ps(a, load8(gu, n + j, bf16)), bf16);
    }
}

static int linear(linear_fn f, const struct proj *p, const void *x, int bf16, int64_t rows, int64_t k,
                  void *out, int nt) {
    return f((int)p->bits, x, bf16, rows, k, p->qs, p->d, p->m, p->n, out, nt);
}

/* row r of big [rows, q | k | v heads] (position past + r % length of sequence r / length):
   its query and key heads rotated, its keys and values written into the layer's cache */
static void rope_row(const struct layer *L, char *big, const void *cos, const void *sin, int64_t r, int64_t length,
                     int64_t past, int64_t heads, int64_t kv_heads, int64_t dim, int bf16) {
    const int64_t size = bf16 ? 2 : 4, nq = heads * dim, nk = kv_heads * dim;
    int64_t b = r / length, i = r % length;
    char *row = big + r * (nq + 2 * nk) * size;
    const char *c = (const char *)cos + r * dim * size, *s = (const char *)sin + r * dim * size;
    for (int64_t t = 0; t < heads + kv_heads; t++) rope_head(row + t * dim * size, c, s, dim, bf16);
    for (int64_t g = 0; g < kv_heads; g++) {
        memcpy((char *)L->keys + size * (b * L->kst[0] + g * L->kst[1] + (past + i) * L->kst[2]),
               row + (nq + g * dim) * size, (size_t)(dim * size));
        memcpy((char *)L->values + size * (b * L->vst[0] + g * L->vst[1] + (past + i) * L->vst[2]),
               row + (nq + nk + g * dim) * size, (size_t)(dim * size));
    }
}

/* A layer from its attention's output on: rows rows of h [rows, hidden] (in place) and of att_out
   [rows, hidden]; x [rows, hidden], big [rows, max(hidden, 2 * inter)] and act [rows, inter]
   scratch. With a `next` layer, x is then its first norm of h. 0, or -1 when out of memory. */
static int after_attention(const struct layer *L, const struct layer *next, int bf16, int64_t rows, int64_t hidden,
                           int64_t inter, void *h, const void *att_out, char *x, char *big, char *act, linear_fn lin,
                           int nt) {
    const int64_t size = bf16 ? 2 : 4;
    if (linear(lin, &L->o, att_out, bf16, rows, hidden, big, nt))
        return -1;
    add_rows(h, big, rows, hidden, bf16, L->norm2, L->eps2, x, nt);
    if (linear(lin, &L->gate_up, x, bf16, rows, hidden, big, nt))
        return -1;
    FOR_SPLIT(rows * inter >= SPLIT_FROM, r, rows, silu_mul_row(big + r * 2 * inter * size, inter, act + r * inter * size, bf16););
    if (linear(lin, &L->down, act, bf16, rows, inter, big, nt))
        return -1;
    add_rows(h, big, rows, hidden, bf16, next ? next->norm1 : NULL, next ? next->eps1 : 0, x, nt);
    return 0;
}

/* The decoder layers on h [batch * length, hidden] (updated in place): rows b * length + i,
   position past + i of sequence b. cos / sin [batch * length, dim] (sin with its first half
   negated); mask [batch, past + length] or NULL; the cache buffers have room for the new
   positions, which are written at past .. past + length - 1. A step keeps the last position's
   logits alone, so the last layer takes every row's keys and values into the cache but only
   each sequence's last row on from there (its attention, MLP and residuals: what llama.cpp's
   last layer does too); the other rows of h keep the layer before's. A row's arithmetic is the
   same either way (every row is computed alone). 0, or -1 when out of memory. */
int llama_layers(int bf16, int64_t count, const struct layer *layers, int64_t batch, int64_t length,
                 int64_t past, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t dim,
                 int64_t inter, void *h, const void *cos, const void *sin, const uint8_t *mask,
                 double scale, linear_fn lin, attend_fn att, int nt) {
    const int64_t rows = batch * length, size = bf16 ? 2 : 4, nq = heads * dim, nk = kv_heads * dim;
    const int64_t nqkv = nq + 2 * nk, wide = 2 * inter > nqkv ? 2 * inter : nqkv;
    char *x = malloc((size_t)(rows * hidden * size)), *big = malloc((size_t)(rows * wide * size));
    char *att_out = malloc((size_t)(rows * hidden * size)), *act = malloc((size_t)(rows * inter * size));
    char *last = malloc((size_t)(batch * hidden * size));   /* the sequences' last rows */
    int failed = !x || !big || !att_out || !act || !last;
    const int64_t qst[3] = {length * nqkv, dim, nqkv};
    for (int64_t l = 0; l < count && !failed; l++) {
        const struct layer *L = layers + l;
        const int cut = l == count - 1 && length > 1;
        if (l == 0)   /* the later layers' first norm: the layer before's last step */
            FOR_SPLIT(rows * hidden >= SPLIT_FROM, r, rows,
                      rms_row((char *)h + r * hidden * size, L->norm1, L->eps1, hidden, x + r * hidden * size, bf16););
        if ((failed |= linear(lin, &L->qkv, x, bf16, rows, hidden, big, nt))) break;
        FOR_SPLIT(rows * nqkv >= SPLIT_FROM, r, rows, rope_row(L, big, cos, sin, r, length, past, heads, kv_heads, dim, bf16););
        const int64_t st[9] = {qst[0], qst[1], qst[2], L->kst[0], L->kst[1], L->kst[2],
                               L->vst[0], L->vst[1], L->vst[2]};
        if (!cut) {
            failed |= att(bf16, big, L->keys, L->values, st, batch, heads, kv_heads, length, past + length,
                          dim, mask, (float)scale, att_out, nt);
            if (!failed) failed = after_attention(L, l + 1 < count ? L + 1 : NULL, bf16, rows, hidden, inter, h, att_out, x,
                                                  big, act, lin, nt);
            continue;
        }
        /* the last rows' queries (row length - 1 of each sequence) against all their keys */
        failed |= att(bf16, big + (length - 1) * nqkv * size, L->keys, L->values, st, batch, heads, kv_heads, 1,
                      past + length, dim, mask, (float)scale, att_out, nt);
        for (int64_t b = 0; b < batch; b++)
            memcpy(last + b * hidden * size, (char *)h + ((b + 1) * length - 1) * hidden * size, (size_t)(hidden * size));
        if (!failed) failed = after_attention(L, NULL, bf16, batch, hidden, inter, last, att_out, x, big, act, lin, nt);
        for (int64_t b = 0; b < batch; b++)
            memcpy((char *)h + ((b + 1) * length - 1) * hidden * size, last + b * hidden * size, (size_t)(hidden * size));
    }
    free(x);
    free(big);
    free(att_out);
    free(act);
    free(last);
    return failed ? -1 : 0;
}
