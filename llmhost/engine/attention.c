/* llmhost's CPU attention (decode steps; every forward of a load whose rows are computed
 * alone): each query row against the keys and values of its own sequence, float32 arithmetic
 * on float32 or bfloat16 tensors (AVX2 and FMA, or AVX-512).
 *
 * Why: for a decode step torch's CPU scaled_dot_product_attention runs its flash-attention
 * kernel, which is built for many query rows; with one query row per head it spent 114-196 us
 * a layer on SmolLM2 at 1,700 cached positions (two cores), two thirds of the whole decode
 * step, where the arithmetic is a few microseconds and reading the keys and values about
 * 65 us. attention.py says when it is used.
 *
 * One unit of work is one query row of one key/value head and a stretch of up to SPAN of the
 * keys that row may see (those before and at its own position whose mask is set): the scores
 * of every query head reading that key/value head (grouped-query attention), their softmax
 * weights relative to the stretch's maximum, and the weighted sums of the values, all in
 * float32, each key and value read once for the group. A second pass joins a row's stretches
 * (flash-decoding's split: one long row keeps both cores busy; a row whose keys are one stretch
 * is joined by its unit). A stretch is counted in the
 * row's own keys, not the cache's positions, so a row's arithmetic is the same whatever its
 * left padding, its batch, the forward's other rows and the threads: a key's value depends only
 * on the row's tokens up to it (attention.py says what that buys). Vectors are AVX-512's where
 * the CPU has it (attention.py compiles with -mavx512f), else AVX2's; with AVX512-BF16 a
 * bfloat16 query's scores are vdpbf16ps on the keys as stored (pairs of products into float32
 * lanes: a prompt's attention 1.4x faster), the weighted sums of the values staying float32.
 * With AMX (amx_bf16) bfloat16 attention runs on the tiles instead, a block of query rows per
 * unit (amx_units, below): other bits than the vectors', the same for a row alone or batched.
 * A prompt's rows go 16 (AVX-512) or 8 (AVX2) to a unit, a row a lane (block_units, below), with
 * the row path's operations in the row path's order: the same bits as a row alone.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#ifdef __AVX512F__
#define LANES 16
typedef __m512 vec;
static inline vec vload(const void *p, int bf16) { return load16(p, 0, bf16); }
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vfma _mm512_fmadd_ps
#define vfnma _mm512_fnmadd_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vmax _mm512_max_ps
#define vloadu _mm512_loadu_ps
#define vstoreu _mm512_storeu_ps
#define vfloor(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
/* y * 2^fx (fx integral, 2^fx a normal float): one vscalefps, the same single rounding of the
   same exact product as a multiply by 2^fx built from its bits (the AVX2 build's) */
#define vscale2(y, fx) _mm512_scalef_ps(y, fx)
#define vhmax _mm512_reduce_max_ps
/* the lane sum: lanes l + 8 and l, then j + 4 and j, then (0 + 2) + (1 + 3) (GCC's
   _mm512_reduce_add_ps, written out: block_scores and block_softmax add in this order too) */
static inline float vhsum(__m512 v) {
    __m256 h = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), _mm512_castps512_ps256(v));
    __m128 c = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
    __m128 d = _mm_add_ps(c, _mm_shuffle_ps(c, c, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, _MM_SHUFFLE(1, 1, 1, 1))));
}
static inline __m256 half_sum(__m512 v) {   /* lanes i and i + 8 added */
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#else
#define LANES 8
typedef __m256 vec;
static inline vec vload(const void *p, int bf16) { return load8(p, 0, bf16); }
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vfma _mm256_fmadd_ps
#define vfnma _mm256_fnmadd_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vmax _mm256_max_ps
#define vloadu _mm256_loadu_ps
#define vstoreu _mm256_storeu_ps
#define vfloor _mm256_floor_ps
#define vscale2(y, fx) _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32( \
    _mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23)))
static inline __m256 half_sum(__m256 v) { return v; }
static inline float vhmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float vhsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* the lane sums of four vectors, in order */
static inline __m128 sum4(vec a0, vec a1, vec a2, vec a3) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(half_sum(a0), half_sum(a1)), _mm256_hadd_ps(half_sum(a2), half_sum(a3)));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

#ifdef __AVX512BF16__
/* the lane sums of 16 vectors (one key's each), in key order: each key's halves added (lanes l
   and l + 8), then its quarters (l and l + 4), then within them (l and l + 2, then l and l + 1)
   by shuffles that put four keys' partial sums side by side: 3 instructions a key, where sum4
   takes 5 */
static inline __m512 sum16(const __m512 a[16]) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++)   /* keys 2i and 2i + 1: quarters [0 + 2, 1 + 3] of each */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++)   /* keys 4i .. 4i + 3: a quarter each, 4 partial sums */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* quarter q: elements 0 + 2 and 1 + 3 of keys q, 4 + q (c[0], c[1]), then of 8 + q, 12 + q */
    __m512 lo = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    __m512 hi = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
    __m512 r = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(lo), _mm512_castps_pd(hi))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(lo), _mm512_castps_pd(hi))));
    /* lane 4q + j holds key 4j + q */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}
#endif

/* e^x per lane (Cephes' expf: range reduction by ln 2, degree-5 polynomial; relative error
   about 1e-7; x <= 0 here, clamped at -87 where e^x is 0 to float32's eye) */
static inline vec vexp(vec x) {
    x = vmax(x, vset1(-87.3f));
    vec fx = vfloor(vfma(x, vset1(1.44269504088896341f), vset1(0.5f)));
    x = vfnma(fx, vset1(0.693359375f), x);
    x = vfnma(fx, vset1(-2.12194440e-4f), x);
    vec y = vset1(1.9875691500e-4f);
    y = vfma(y, x, vset1(1.3981999507e-3f));
    y = vfma(y, x, vset1(8.3334519073e-3f));
    y = vfma(y, x, vset1(4.1665795894e-2f));
    y = vfma(y, x, vset1(1.6666665459e-1f));
    y = vfma(y, x, vset1(5.0000001201e-1f));
    y = vfma(y, vmul(x, x), vadd(x, vset1(1.0f)));
    return vscale2(y, fx);
}

/* p[0 .. LANES) = x rounded to bfloat16 as torch's .to(bfloat16) rounds (to nearest even; a NaN
   keeps its high bits, quieted) */
static inline void store_bf16(uint16_t *p, vec x) {
#ifdef __AVX512F__
    __m512i u = _mm512_castps_si512(x);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                  _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
#else
    __m256i u = _mm256_castps_si256(x);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                  _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))), 16);
    /* a NaN: |u| > 0x7f800000, compared as signed (both below 2^31) */
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
#endif
}

/* a span's n scores s[0..n) -> their weights e^(s - the span's max) in place; res[0] = that max,
   res[1] = the weights' sum. s has room for LANES more (set to the max: e^0, not counted). */
static inline void softmax(float *s, int64_t n, float *res) {
    /* the max a vector at a time (one compare after another waited on each: a fifth of a
       prompt's attention); a max is exact in any order */
    vec most = vset1(s[0]);
    int64_t t = 0;
    for (; t + LANES <= n; t += LANES) most = vmax(vloadu(&s[t]), most);
    float top = vhmax(most);
    for (; t < n; t++) top = s[t] > top ? s[t] : top;
    for (int64_t t = n; t < n + LANES; t++) s[t] = top;
    vec total = vzero(), mx = vset1(top);
    for (int64_t t = 0; t < n; t += LANES) {
        vec e = vexp(vsub(vloadu(&s[t]), mx));
        vstoreu(&s[t], e);
        if (t + LANES <= n) total = vadd(total, e);
    }
    float sum = vhsum(total);
    for (int64_t t = n - n % LANES; t < n; t++) sum += s[t];   /* the last few */
    res[0] = top;
    res[1] = sum;
}

#define SPAN 512          /* keys per unit of work */
/* CALL(group, nc) with constant arguments for the common shapes (1-4 query heads per KV head,
   4 or 8 vectors a head), so that the inlined loops keep their sums in registers; the same
   operations either way */
#define SHAPES(CALL) do { \
        if (nc == 4 && group == 1) CALL(1, 4); \
        else if (nc == 4 && group == 2) CALL(2, 4); \
        else if (nc == 4 && group == 3) CALL(3, 4); \
        else if (nc == 4 && group == 4) CALL(4, 4); \
        else if (nc == 8 && group == 1) CALL(1, 8); \
        else if (nc == 8 && group == 2) CALL(2, 8); \
        else if (nc == 8 && group == 3) CALL(3, 8); \
        else if (nc == 8 && group == 4) CALL(4, 8); \
        else CALL(group, nc); \
    } while (0)
#define MAXG 16           /* query heads per key/value head */
#define MAXC (256 / LANES)

/* one (row, head)'s spans joined: res its first span's max, sum and weighted values (the next
   span's `part` floats on), count the spans' key counts; out (the row's head, float32 or
   bfloat16) = the weighted values / the weights' sum */
static inline void join(const float *res, const int32_t *count, int64_t spans, int64_t part, int64_t dim,
                        int bf16, void *out) {
    const int64_t nc = dim / LANES;
    float top = -INFINITY, sum = 0.0f;
    vec o[MAXC];
    for (int64_t c = 0; c < nc; c++) o[c] = vzero();
    for (int64_t s = 0; s < spans; s++)
        if (count[s]) top = res[s * part] > top ? res[s * part] : top;
    for (int64_t s = 0; s < spans; s++) {
        if (!count[s]) continue;
        const float *at = res + s * part;
        float w = expf(at[0] - top);
        sum = fmaf(w, at[1], sum);
        for (int64_t c = 0; c < nc; c++) o[c] = vfma(vset1(w), vloadu(at + 2 + LANES * c), o[c]);
    }
    vec inv = vset1(sum > 0.0f ? 1.0f / sum : 0.0f);
    for (int64_t c = 0; c < nc; c++) {
        if (bf16) store_bf16((uint16_t *)out + LANES * c, vmul(o[c], inv));
        else vstoreu((float *)out + LANES * c, vmul(o[c], inv));
    }
}

/* whether the row path scores a bfloat16 row by vdpbf16ps (AVX512-BF16: the keys' pairs straight
   into float32 lanes, other sums than the widened keys'): the block path's block_pair_scores
   repeats it */
static inline int pair_scores(int bf16, int64_t dim) {
#ifdef __AVX512BF16__
    return bf16 && dim % 32 == 0;
#else
    (void)bf16;
    (void)dim;
    return 0;
#endif
}

/* score[h * sstride + t] = scale times the dot product of head h's query (qrow, heads qhead
   elements apart) with the span's key t, for `group` heads and nc vectors of dim; constant
   `group` and `nc` where inlined */
static inline __attribute__((always_inline)) void scores(
        const char *qrow, int64_t qhead, const char *kb, int64_t kstride, const int32_t *index,
        int64_t n, int bf16, int64_t size, int64_t group, int64_t nc, int64_t dim, float scale,
        float *score, int64_t sstride) {
    int64_t t = 0;
#ifdef __AVX512BF16__
    if (pair_scores(bf16, dim)) {   /* bfloat16 pairs straight into float32 lanes: no widening */
        const int64_t np = nc * LANES / 32;   /* a constant where inlined: the pairs stay in registers */
        __m512bh qb[MAXG][MAXC / 2];
        for (int64_t h = 0; h < group; h++) {
            const char *qr = qrow + 2 * h * qhead;
            for (int64_t c = 0; c < np; c++) qb[h][c] = (__m512bh)_mm512_loadu_si512(qr + 64 * c);
        }
        for (; t + 16 <= n; t += 16)   /* 16 keys at a time, a head at a time (sum16) */
            for (int64_t h = 0; h < group; h++) {
                __m512 a[16];
                for (int x = 0; x < 16; x++) {
                    const char *kr = kb + 2 * index[t + x] * kstride;
                    a[x] = _mm512_dpbf16_ps(vzero(), qb[h][0], (__m512bh)_mm512_loadu_si512(kr));
                    for (int64_t c = 1; c < np; c++)
                        a[x] = _mm512_dpbf16_ps(a[x], qb[h][c], (__m512bh)_mm512_loadu_si512(kr + 64 * c));
                }
                _mm512_storeu_ps(score + h * sstride + t, _mm512_mul_ps(sum16(a), _mm512_set1_ps(scale)));
            }
        for (; t + 4 <= n; t += 4) {   /* scores, four keys at a time, each read once for the group */
            __m512bh kk[4][MAXC / 2];
            for (int x = 0; x < 4; x++)
                for (int64_t c = 0; c < np; c++)
                    kk[x][c] = (__m512bh)_mm512_loadu_si512(kb + 2 * (index[t + x] * kstride + 32 * c));
            for (int64_t h = 0; h < group; h++) {
                vec a[4];
                for (int x = 0; x < 4; x++) {
                    a[x] = _mm512_dpbf16_ps(vzero(), qb[h][0], kk[x][0]);
                    for (int64_t c = 1; c < np; c++) a[x] = _mm512_dpbf16_ps(a[x], qb[h][c], kk[x][c]);
                }
                _mm_storeu_ps(score + h * sstride + t, _mm_mul_ps(sum4(a[0], a[1], a[2], a[3]), _mm_set1_ps(scale)));
            }
        }
        for (; t < n; t++) {   /* the last few keys */
            const char *kr = kb + 2 * index[t] * kstride;
            for (int64_t h = 0; h < group; h++) {
                vec a = _mm512_dpbf16_ps(vzero(), qb[h][0], (__m512bh)_mm512_loadu_si512(kr));
                for (int64_t c = 1; c < np; c++)
                    a = _mm512_dpbf16_ps(a, qb[h][c], (__m512bh)_mm512_loadu_si512(kr + 64 * c));
                score[h * sstride + t] = vhsum(a) * scale;
            }
        }
    } else
#endif
    {
        vec qv[MAXG][MAXC];
        for (int64_t h = 0; h < group; h++) {
            const char *qr = qrow + size * h * qhead;
            for (int64_t c = 0; c < nc; c++) qv[h][c] = vload(qr + size * LANES * c, bf16);
        }
        for (; t + 4 <= n; t += 4) {   /* scores, four keys at a time, each read once for the group */
            vec kv[4][MAXC];
            for (int x = 0; x < 4; x++)
                for (int64_t c = 0; c < nc; c++) kv[x][c] = vload(kb + size * (index[t + x] * kstride + LANES * c), bf16);
            for (int64_t h = 0; h < group; h++) {
                vec a[4];
                for (int x = 0; x < 4; x++) {
                    a[x] = vmul(qv[h][0], kv[x][0]);
                    for (int64_t c = 1; c < nc; c++) a[x] = vfma(qv[h][c], kv[x][c], a[x]);
                }
                _mm_storeu_ps(score + h * sstride + t, _mm_mul_ps(sum4(a[0], a[1], a[2], a[3]), _mm_set1_ps(scale)));
            }
        }
        for (; t < n; t++) {   /* the last few keys */
            const char *kr = kb + size * index[t] * kstride;
            for (int64_t h = 0; h < group; h++) {
                vec a = vmul(qv[h][0], vload(kr, bf16));
                for (int64_t c = 1; c < nc; c++) a = vfma(qv[h][c], vload(kr + size * LANES * c, bf16), a);
                score[h * sstride + t] = vhsum(a) * scale;
            }
        }
    }
}

/* res[h * rstride + 2 + d] = the sum over the span's n keys of score[h * sstride + t] times
   value t, for `group` heads and nc vectors of dim; constant `group` and `nc` where inlined */
static inline __attribute__((always_inline)) void weighted(
        const char *vb, int64_t vstride, const int32_t *index, int64_t n, const float *score,
        int64_t sstride, int bf16, int64_t size, int64_t group, int64_t nc, float *res,
        int64_t rstride) {
    vec acc[MAXG][MAXC];
#ifdef __AVX512F__
    /* bfloat16 values 32 at a time: the even ones and the odd ones widened by one instruction
       each (acc[h][c], c even: dims 16c + 2i; c + 1: 16c + 2i + 1), interleaved back at the end;
       each dim takes the same multiply-adds in the same order, so the same bits (a prompt's
       attention ~5% faster) */
    const int pairs = bf16 && nc % 2 == 0;
#endif
    for (int64_t h = 0; h < group; h++)
        for (int64_t c = 0; c < nc; c++) acc[h][c] = vzero();
    for (int64_t t = 0; t < n; t++) {
        const char *vr = vb + size * index[t] * vstride;
        vec vv[MAXC];
#ifdef __AVX512F__
        if (pairs)
            for (int64_t c = 0; c < nc; c += 2) {
                __m512i w = _mm512_loadu_si512(vr + 32 * c);
                vv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
                vv[c + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)));
            }
        else
#endif
            for (int64_t c = 0; c < nc; c++) vv[c] = vload(vr + size * LANES * c, bf16);
        for (int64_t h = 0; h < group; h++) {
            vec p = vset1(score[h * sstride + t]);
            for (int64_t c = 0; c < nc; c++) acc[h][c] = vfma(p, vv[c], acc[h][c]);
        }
    }
    for (int64_t h = 0; h < group; h++)
        for (int64_t c = 0; c < nc; c++) {
#ifdef __AVX512F__
            if (pairs) {   /* dims 16c .. 16c + 15 from lanes 0-7 (c even) or 8-15 (c odd) of the pair */
                const __m512i lanes = c % 2 ? _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)
                                            : _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                vstoreu(res + h * rstride + 2 + LANES * c,
                        _mm512_permutex2var_ps(acc[h][c - c % 2], lanes, acc[h][c - c % 2 + 1]));
                continue;
            }
#endif
            vstoreu(res + h * rstride + 2 + LANES * c, acc[h][c]);
        }
}

/* Each sequence's keys ranked (those whose mask is set, in position order; with no mask every
   position, for all the sequences at once): pos[r] the position of the key of rank r, upto[j]
   how many are at positions <= j. A unit's span of keys is then a stretch of pos, and a row's
   count of them a difference of upto (each unit ranking its row's keys itself, a loop over them
   all, took 11% of a 1,024-token prompt's attention). */
static void rank_keys(const uint8_t *mask, int64_t batch, int64_t keys, int32_t *pos, int32_t *upto) {
    for (int64_t b = 0; b < batch; b++) {
        int32_t rank = 0;
        for (int64_t j = 0; j < keys; j++) {
            if (!mask || mask[b * keys + j])
                pos[b * keys + rank++] = (int32_t)j;
            upto[b * keys + j] = rank;
        }
    }
}

/* of a sequence's ranked keys (rank_keys' pos and upto at its first), those of span `span` at
   positions up to `last`: *index at the first of them, their count returned */
static inline int64_t span_keys(const int32_t *pos, const int32_t *upto, int64_t span, int64_t last,
                                const int32_t **index) {
    int64_t n = upto[last] - span * SPAN;
    *index = pos + span * SPAN;
    return n < 0 ? 0 : n < SPAN ? n : SPAN;
}

/* The keys of a unit of `rows` consecutive query rows (the first at position own0 of the keys)
   and span: *index the span of the last row's keys (which sees the most: positions up to own0 +
   rows - 1), their count returned, and each row j's count of them, the first n_of[j] (its own
   span: a prefix), also into count[j * spans]. */
static inline int64_t unit_keys(const int32_t *pos, const int32_t *upto, int64_t own0, int64_t rows,
                                int64_t span, const int32_t **index, int32_t *n_of, int32_t *count,
                                int64_t spans) {
    int64_t n = span_keys(pos, upto, span, own0 + rows - 1, index);
    for (int64_t j = 0; j < rows; j++) {
        int64_t seen = upto[own0 + j] - span * SPAN;
        n_of[j] = (int32_t)(seen < 0 ? 0 : seen < n ? seen : n);
        count[j * spans] = n_of[j];
    }
    return n;
}

/* Rows in lanes: a prompt's rows LANES (16 or 8) to a unit (block_units), each row's arithmetic the row
 * path's above, operation for operation, so a row has the same bits alone (a decode step, the
 * row path) or in a prompt. The row path spends most of a prompt's attention on each key's
 * horizontal sums (sum4) and on its latency chains; here lane j of every vector is the block's
 * row j, and nothing is added across lanes:
 * - the scores (block_scores): for each key, lane l's chain of products (dims l, LANES + l, ...:
 *   a vector of LANES rows each, the key's dim broadcast once for up to 3 heads), then the LANES
 *   chains added in sum4's tree (a row's keys in whole fours) or vhsum's (its last n % 4), times
 *   the scale;
 * - the softmax (block_softmax): each row's max, e^(s - max) and the sum of its weights in
 *   softmax()'s order (LANES running sums by key mod LANES over the row's whole LANES-key runs,
 *   vhsum's tree, then its last ones one at a time);
 * - the weighted values (block_values): as weighted() adds them, a dim a lane, two rows and up
 *   to 3 heads at a time (with 8 lanes 16 dims at a time: two rows' 12 sums in the 16
 *   registers; each value read once for them), VALUE_KEYS keys a pass. With 8 lanes a row at a
 *   time (32 dims: each value read and widened for every row) the values took 4.8 of a layer's
 *   8.9 ms at 1,024 tokens, ~46% of what the two multiply-add pipes issue; two rows at a time
 *   the attention ran 1.36x, 1.26x and 1.13x as fast at 1,024, 128 and 40 tokens (the same
 *   bits; thirty-fourth session).
 * The Ice Lake cores measured here load ~1.1-1.2 vectors a cycle from L1 where they issue two
 * multiply-adds, so each loop keeps ~0.3-0.4 loads per multiply-add: a first version that
 * broadcast a key dim per multiply-add ran no faster than the row path.
 * A 512-token prompt's attention ran 1.5-2.0x as fast as on the row path (SmolLM2's shape,
 * float32, Ice Lake; 1.35-1.8x at 128 tokens; docs/performance.md), its prefill ~1.1x. Where the
 * CPU scores bfloat16 pairs (AVX512-BF16: other sums) block_pair_scores gives a block's rows
 * those sums (an AMD EPYC, Zen 5: a 512-token prompt's attention 1.12-1.18x the row path's, which
 * ran as fast as the float32 blocks there; twenty-ninth session). Not where the CPU has AMX tiles.
 * With AVX2's 8 lanes (twenty-sixth session) the row path read a row's keys and values from L2
 * for every row, and at 1,024 tokens (two spans a row) a layer's attention took 4.6x the
 * AVX-512 blocks' time; a block of 8 rows reads each key once. */
#define BLOCK LANES       /* rows a unit: the lanes */
#define SCORE_KEYS 16     /* keys whose dims a unit copies (float32) for a pass of the scores */
#define VALUE_KEYS 64     /* keys a pass of the weighted values */

/* A set of lanes (rows): AVX-512's mask register, or AVX2's vector of all-ones lanes; the masked
   operations give those lanes the unmasked operation's result, the others keep theirs. */
#ifdef __AVX512F__
typedef __m512i ivec;
typedef __mmask16 lanes;
#define iload(p) _mm512_loadu_si512(p)
#define iset1 _mm512_set1_epi32
#define iandnot _mm512_andnot_si512
#define lanes_gt(a, b) _mm512_cmpgt_epi32_mask(a, b)   /* lanes where a > b */
#define lanes_le(a, b) _mm512_cmple_epi32_mask(a, b)
#define lanes_and(a, b) ((a) & (b))
#define lanes_any(m) (m)
#define lanes_all(m) ((m) == 0xffff)
#define mask_mov(a, m, b) _mm512_mask_mov_ps(a, m, b)
#define mask_max(a, m, x) _mm512_mask_max_ps(a, m, x, a)
#define mask_add(a, m, x) _mm512_mask_add_ps(a, m, a, x)
#define transpose_block transpose16
#else
typedef __m256i ivec;
typedef __m256 lanes;
#define iload(p) _mm256_loadu_si256((const __m256i *)(p))
#define iset1 _mm256_set1_epi32
#define iandnot _mm256_andnot_si256
#define lanes_gt(a, b) _mm256_castsi256_ps(_mm256_cmpgt_epi32(a, b))
#define lanes_le(a, b) _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpgt_epi32(a, b), _mm256_set1_epi32(-1)))
#define lanes_and _mm256_and_ps
#define lanes_any(m) _mm256_movemask_ps(m)
#define lanes_all(m) (_mm256_movemask_ps(m) == 0xff)
#define mask_mov(a, m, b) _mm256_blendv_ps(a, b, m)
#define mask_max(a, m, x) _mm256_blendv_ps(a, _mm256_max_ps(x, a), m)
#define mask_add(a, m, x) _mm256_blendv_ps(a, _mm256_add_ps(a, x), m)
#define transpose_block transpose8
#endif

/* A key's LANES chains (b[l], l < 8: with 16 lanes chains l and l + 8 already added, as
   half_sum adds them) summed in sum4's tree, or in the lanes of `tail` in vhsum's */
static inline vec vhsum_lanes(const vec b[8]) {
    return vadd(vadd(vadd(b[0], b[4]), vadd(b[2], b[6])), vadd(vadd(b[1], b[5]), vadd(b[3], b[7])));
}

static inline vec tree(const float *at, lanes tail) {
    vec b[8];
    for (int l = 0; l < 8; l++) b[l] = vloadu(at + l * SCORE_KEYS * BLOCK);
    if (lanes_all(tail))
        return vhsum_lanes(b);
    vec s = vadd(vadd(vadd(b[0], b[1]), vadd(b[2], b[3])), vadd(vadd(b[4], b[5]), vadd(b[6], b[7])));
    return lanes_any(tail) ? mask_mov(s, tail, vhsum_lanes(b)) : s;
}

/* st[h * SPAN * BLOCK + t * BLOCK + j] (t0 <= t < t0 + nk, h < G) = scale times the dot product
   of row j's query for head h (qt: the block's queries transposed, [h][dim][BLOCK]) with key t
   (kf: its dims, float32, t0's first); f4: lane j the end of row j's whole fours of keys.
   b: scratch [G][8][SCORE_KEYS][BLOCK]. Each key dim is broadcast once for the G heads; G and nc
   constants where inlined (the queries' vectors of a lane l in registers). */
static inline __attribute__((always_inline)) void block_scores(
        const float *qt, const float *kf, int64_t nk, int64_t t0, int64_t G, int64_t nc, float scale,
        ivec f4, float *st, float *b) {
    const int64_t dim = nc * LANES;
    /* lane l's chain (dims l, LANES + l, ...); with 16 lanes chain l + 8 too (dims 8 + l, 24 + l,
       ...), added to it as half_sum adds them. With 8 lanes the chains go in passes of 4 of the
       head's vectors (a chain's sum waits in b between them), so that the queries of 3 heads fit
       the 16 registers and each broadcast key dim feeds 3 multiply-adds */
    const int64_t cp = LANES == 16 ? nc : 4;
    for (int l = 0; l < 8; l++)
        for (int64_t c0 = 0; c0 < nc; c0 += cp) {
            const int64_t cn = nc - c0 < cp ? nc - c0 : cp;   /* this pass's vectors */
            vec lo[3][MAXC], hi[3][MAXC];
            for (int64_t h = 0; h < G; h++)
                for (int64_t c = 0; c < cn; c++) {
                    lo[h][c] = vloadu(qt + (h * dim + LANES * (c0 + c) + l) * BLOCK);
                    if (LANES == 16) hi[h][c] = vloadu(qt + (h * dim + LANES * (c0 + c) + l + 8) * BLOCK);
                }
            for (int64_t x = 0; x < nk; x++) {
                const float *kr = kf + x * dim + LANES * c0;
                float *at = b + (l * SCORE_KEYS + x) * BLOCK;   /* head h's: at + h * 8 * SCORE_KEYS * BLOCK */
                vec a[3], e[3], kl = vset1(kr[l]), kh = vset1(kr[(l + 8) % LANES]);
                for (int64_t h = 0; h < G; h++) {
                    a[h] = c0 ? vfma(lo[h][0], kl, vloadu(at + h * 8 * SCORE_KEYS * BLOCK)) : vmul(lo[h][0], kl);
                    if (LANES == 16) e[h] = vmul(hi[h][0], kh);
                }
                for (int64_t c = 1; c < cn; c++) {
                    kl = vset1(kr[LANES * c + l]);
                    if (LANES == 16) kh = vset1(kr[LANES * c + l + 8]);
                    for (int64_t h = 0; h < G; h++) {
                        a[h] = vfma(lo[h][c], kl, a[h]);
                        if (LANES == 16) e[h] = vfma(hi[h][c], kh, e[h]);
                    }
                }
                for (int64_t h = 0; h < G; h++)
                    vstoreu(at + h * 8 * SCORE_KEYS * BLOCK, LANES == 16 ? vadd(a[h], e[h]) : a[h]);
            }
        }
    for (int64_t h = 0; h < G; h++)
        for (int64_t x = 0; x < nk; x++) {
            lanes tail = lanes_le(f4, iset1((int)(t0 + x)));
            vstoreu(st + h * SPAN * BLOCK + (t0 + x) * BLOCK,
                    vmul(tree(b + (h * 8 * SCORE_KEYS + x) * BLOCK, tail), vset1(scale)));
        }
}

#ifdef __AVX512BF16__
/* block_scores where the row path scores bfloat16 pairs (pair_scores): lane l of the row path's
   vector for a key is the chain vdpbf16ps(vdpbf16ps(0, the query's dword l, the key's dword l),
   dword 16 + l, ...), 16 lanes then added in sum16's tree (halves, quarters, then within them),
   sum4's (a key of the row's whole fours after its whole sixteens) or vhsum's (the last keys).
   Here those chains run with the block's rows in the lanes (qp: the queries' dwords transposed,
   [h][c][16][BLOCK], each key dword broadcast), chains l and l + 8 added at once (the first step
   of every one of the trees), and sum16's tree is vhsum's: st, f4, b as block_scores', f16 lane j
   the end of row j's whole sixteens; the key pairs read from the cache as stored. G and np
   constants where inlined. */
static inline __attribute__((always_inline)) void block_pair_scores(
        const float *qp, const char *kb, int64_t kstride, const int32_t *index, int64_t nk, int64_t t0,
        int64_t G, int64_t np, float scale, ivec f16, ivec f4, float *st, float *b) {
    for (int l = 0; l < 8; l++) {
        __m512bh lo[3][MAXC / 2], hi[3][MAXC / 2];
        for (int64_t h = 0; h < G; h++)
            for (int64_t c = 0; c < np; c++) {
                lo[h][c] = (__m512bh)vloadu(qp + ((h * np + c) * 16 + l) * BLOCK);
                hi[h][c] = (__m512bh)vloadu(qp + ((h * np + c) * 16 + l + 8) * BLOCK);
            }
        for (int64_t x = 0; x < nk; x++) {
            const int32_t *kr = (const int32_t *)(kb + 2 * index[t0 + x] * kstride);
            vec a[3], e[3];   /* chains l and l + 8 */
            for (int64_t h = 0; h < G; h++) a[h] = e[h] = vzero();
            for (int64_t c = 0; c < np; c++) {
                __m512bh kl = (__m512bh)_mm512_set1_epi32(kr[16 * c + l]);
                __m512bh kh = (__m512bh)_mm512_set1_epi32(kr[16 * c + l + 8]);
                for (int64_t h = 0; h < G; h++) {
                    a[h] = _mm512_dpbf16_ps(a[h], lo[h][c], kl);
                    e[h] = _mm512_dpbf16_ps(e[h], hi[h][c], kh);
                }
            }
            for (int64_t h = 0; h < G; h++) vstoreu(b + ((h * 8 + l) * SCORE_KEYS + x) * BLOCK, vadd(a[h], e[h]));
        }
    }
    for (int64_t h = 0; h < G; h++)
        for (int64_t x = 0; x < nk; x++) {
            ivec t = iset1((int)(t0 + x));
            lanes fours = lanes_and(lanes_le(f16, t), lanes_gt(f4, t));   /* sum4's tree there, else vhsum's */
            vstoreu(st + h * SPAN * BLOCK + (t0 + x) * BLOCK,
                    vmul(tree(b + (h * 8 * SCORE_KEYS + x) * BLOCK, (lanes)~fours), vset1(scale)));
        }
}
#endif

/* each row's n[j] scores (st[t * BLOCK + j], t < n[j]; the longest: len) -> their weights
   e^(s - the row's max) in place; top, sum: lane j the row's max and weights' sum */
static inline void block_softmax(float *st, int64_t len, ivec n, vec *top, vec *sum) {
    vec most = vset1(-INFINITY);
    for (int64_t t = 0; t < len; t++) most = mask_max(most, lanes_gt(n, iset1((int)t)), vloadu(st + t * BLOCK));
    /* the row's whole runs of LANES keys into LANES running sums (key t into t % LANES's), as
       softmax()'s vector of sums; then its last ones, one at a time */
    ivec whole = iandnot(iset1(LANES - 1), n);
    vec run[LANES];
    for (int l = 0; l < LANES; l++) run[l] = vzero();
    for (int64_t t0 = 0; t0 < len; t0 += LANES)
        for (int l = 0; l < LANES && t0 + l < len; l++) {
            int64_t t = t0 + l;
            vec e = vexp(vsub(vloadu(st + t * BLOCK), most));
            vstoreu(st + t * BLOCK, e);
            run[l] = mask_add(run[l], lanes_gt(whole, iset1((int)t)), e);
        }
    vec h[8];   /* vhsum's first step (16 lanes: halves added) */
    for (int l = 0; l < 8; l++) h[l] = LANES == 16 ? vadd(run[(l + 8) % LANES], run[l]) : run[l];
    vec total = vhsum_lanes(h);
    /* the first key past some row's whole runs (rows with keys only: a partial block's others
       have none) */
    int32_t nn[LANES], ww[LANES];
    memcpy(nn, &n, sizeof nn);
    memcpy(ww, &whole, sizeof ww);
    int64_t from = len;
    for (int j = 0; j < LANES; j++)
        if (nn[j] > 0 && ww[j] < from) from = ww[j];
    for (int64_t t = from; t < len; t++) {
        lanes last = lanes_and(lanes_le(whole, iset1((int)t)), lanes_gt(n, iset1((int)t)));
        total = mask_add(total, last, vloadu(st + t * BLOCK));
    }
    *top = most;
    *sum = total;
}

/* the weighted values of rows j and j + 1 of a block (R = 2; R = 1: row j alone) for G heads,
   keys from .. to - 1 of them: res[r] + h * rh + 2 + d (0 first where `first`) += the sum
   over row j + r's keys t < n[r] (n[0] <= n[1]) of its weight st[h * SPAN * BLOCK + t * BLOCK + r]
   times value t's dim d (d < nc * LANES: all of a head's or, vb and res moved on, a stretch of
   them), key after key as weighted() adds them (a dim a lane: each value read once for the rows
   and heads); R, G and nc constants where inlined */
static inline __attribute__((always_inline)) void block_values(
        const char *vb, int64_t vstride, const int32_t *index, int64_t from, int64_t to, int first,
        const int64_t n[2], const float *st, int bf16, int64_t size, int64_t R, int64_t G, int64_t nc,
        float *const res[2], int64_t rh) {
    vec acc[2][3][MAXC];
    for (int64_t r = 0; r < R; r++)
        for (int64_t h = 0; h < G; h++)
            for (int64_t c = 0; c < nc; c++)
                acc[r][h][c] = first ? vzero() : vloadu(res[r] + h * rh + 2 + LANES * c);
    for (int64_t t = from; t < to && t < n[0]; t++) {   /* keys both rows see */
        const char *vr = vb + size * index[t] * vstride;
        vec vv[MAXC];
        for (int64_t c = 0; c < nc; c++) vv[c] = vload(vr + size * LANES * c, bf16);
        for (int64_t r = 0; r < R; r++)
            for (int64_t h = 0; h < G; h++) {
                vec p = vset1(st[h * SPAN * BLOCK + t * BLOCK + r]);
                for (int64_t c = 0; c < nc; c++) acc[r][h][c] = vfma(p, vv[c], acc[r][h][c]);
            }
    }
    for (int64_t t = from > n[0] ? from : n[0]; R > 1 && t < to && t < n[1]; t++) {   /* the second row's others */
        const char *vr = vb + size * index[t] * vstride;
        for (int64_t c = 0; c < nc; c++) {
            vec v1 = vload(vr + size * LANES * c, bf16);
            for (int64_t h = 0; h < G; h++) acc[1][h][c] = vfma(vset1(st[h * SPAN * BLOCK + t * BLOCK + 1]), v1, acc[1][h][c]);
        }
    }
    for (int64_t r = 0; r < R; r++)
        for (int64_t h = 0; h < G; h++)
            for (int64_t c = 0; c < nc; c++) vstoreu(res[r] + h * rh + 2 + LANES * c, acc[r][h][c]);
}

/* A unit's queries, transposed for the blocks: per head h, its dims in chunks of LANES values
   (with `pairs`, bfloat16 pairs: 2 * LANES values as LANES dwords, as stored), vector x of chunk c
   at qt + ((h * chunks + c) * LANES + x) * BLOCK, lane j row j's (rows past `rows` 0) */
static void transpose_queries(int bf16, int pairs, const void *q, const int64_t *qst, int64_t bb, int64_t g,
                              int64_t group, int64_t i0, int64_t rows, int64_t dim, float *qt) {
    const int64_t size = bf16 ? 2 : 4, per = pairs ? 2 * LANES : LANES, chunks = dim / per;
    for (int64_t h = 0; h < group; h++)
        for (int64_t c = 0; c < chunks; c++) {
            vec col[BLOCK];
            for (int64_t j = 0; j < BLOCK; j++) {
                const char *at = (const char *)q + size * (bb * qst[0] + (g * group + h) * qst[1]
                                                           + (i0 + j) * qst[2] + per * c);
                col[j] = j >= rows ? vzero() : pairs ? vloadu((const float *)at) : vload(at, bf16);
            }
            transpose_block(col);
            for (int x = 0; x < LANES; x++) vstoreu(qt + ((h * chunks + c) * LANES + x) * BLOCK, col[x]);
        }
}

/* a unit's scores (block_scores): its rows' queries transposed into qt, [h][dim][BLOCK], then
   SCORE_KEYS keys a pass (copied into kf as float32), up to 3 heads at a time; sc, b as
   block_units' */
static void block_floats(int bf16, const void *q, const int64_t *qst, int64_t bb, int64_t g, int64_t group,
                         int64_t i0, int64_t rows, int64_t dim, const char *kb, int64_t kstride,
                         const int32_t *index, int64_t n, float scale, ivec nv, float *sc, float *qt, float *kf,
                         float *b) {
    const int64_t size = bf16 ? 2 : 4, nc = dim / LANES;
    ivec f4 = iandnot(iset1(3), nv);
    transpose_queries(bf16, 0, q, qst, bb, g, group, i0, rows, dim, qt);
    for (int64_t t0 = 0; t0 < n; t0 += SCORE_KEYS) {
        int64_t nk = n - t0 < SCORE_KEYS ? n - t0 : SCORE_KEYS;
        for (int64_t x = 0; x < nk; x++)
            for (int64_t c = 0; c < nc; c++)
                vstoreu(kf + x * dim + LANES * c, vload(kb + size * (index[t0 + x] * kstride + LANES * c), bf16));
        for (int64_t h = 0; h < group; h += 3) {
            int64_t G = group - h < 3 ? group - h : 3;
#define SC(G_, C_) block_scores(qt + h * dim * BLOCK, kf, nk, t0, G_, C_, scale, f4, sc + h * SPAN * BLOCK, b)
            if (nc == 4 && G == 3) SC(3, 4);
            else if (nc == 4 && G == 2) SC(2, 4);
            else if (nc == 4) SC(1, 4);
            else if (nc == 8 && LANES == 8 && G == 3) SC(3, 8);   /* AVX2's 64 dims */
            else if (nc == 8 && LANES == 8 && G == 2) SC(2, 8);
            else if (nc == 8 && LANES == 8) SC(1, 8);
            else for (int64_t x = 0; x < G; x++) block_scores(qt + (h + x) * dim * BLOCK, kf, nk, t0, 1, nc, scale, f4,
                                                              sc + (h + x) * SPAN * BLOCK, b);
#undef SC
        }
    }
}

#ifdef __AVX512BF16__
/* a unit's scores with pair_scores (block_pair_scores): as block_floats, the queries' dwords
   (bfloat16 pairs) transposed into qp, [h][dim / 32][16][BLOCK], the keys read where they are */
static void block_pairs(const void *q, const int64_t *qst, int64_t bb, int64_t g, int64_t group, int64_t i0,
                        int64_t rows, int64_t dim, const char *kb, int64_t kstride, const int32_t *index,
                        int64_t n, float scale, ivec nv, float *sc, float *qp, float *b) {
    const int64_t np = dim / 32;
    ivec f16 = iandnot(iset1(15), nv), f4 = iandnot(iset1(3), nv);
    transpose_queries(1, 1, q, qst, bb, g, group, i0, rows, dim, qp);
    for (int64_t t0 = 0; t0 < n; t0 += SCORE_KEYS) {
        int64_t nk = n - t0 < SCORE_KEYS ? n - t0 : SCORE_KEYS;
        for (int64_t h = 0; h < group; h += 3) {
            int64_t G = group - h < 3 ? group - h : 3;
#define PS(G_, P_) block_pair_scores(qp + h * np * 16 * BLOCK, kb, kstride, index, nk, t0, G_, P_, scale, f16, f4, \
                                     sc + h * SPAN * BLOCK, b)
            if (np == 2 && G == 3) PS(3, 2);
            else if (np == 2 && G == 2) PS(2, 2);
            else if (np == 2) PS(1, 2);
            else if (np == 4 && G == 3) PS(3, 4);
            else for (int64_t x = 0; x < G; x++)
                block_pair_scores(qp + (h + x) * np * 16 * BLOCK, kb, kstride, index, nk, t0, 1, np, scale, f16, f4,
                                  sc + (h + x) * SPAN * BLOCK, b);
#undef PS
        }
    }
}
#endif

/* the units of attend() for a prompt's rows in blocks of BLOCK (see block_scores): partial and
   count per (row, span) as attend's loop writes them, and out for a row whose keys are one span.
   Returns -1 when a thread's scratch memory could not be allocated. */
static int block_units(int bf16, const void *q, const void *k, const void *v, const int64_t *st, int64_t batch,
                       int64_t kv_heads, int64_t group, int64_t length, int64_t keys, int64_t dim,
                       const int32_t *pos, const int32_t *upto, int64_t ranked, float scale, int64_t spans,
                       float *partial, int32_t *count, void *out, int nt) {
    const int64_t *qst = st, *kst = st + 3, *vst = st + 6;
    const int64_t size = bf16 ? 2 : 4, nc = dim / LANES, blocks = (length + BLOCK - 1) / BLOCK;
    const int64_t part = group * (dim + 2), units = batch * kv_heads * blocks * spans;
    int failed = 0;
    #pragma omp parallel num_threads(nt) reduction(|:failed)
    {
        /* per thread: the scores (per head, [key][row]), the queries transposed, a pass's keys
           and the chains' sums */
        float *sc = aligned_alloc(64, sizeof(float) * (size_t)(group * SPAN * BLOCK));
        float *qt = aligned_alloc(64, sizeof(float) * (size_t)(group * dim * BLOCK));
        float *kf = aligned_alloc(64, sizeof(float) * (size_t)(SCORE_KEYS * dim));
        float *b = aligned_alloc(64, sizeof(float) * 3 * 8 * SCORE_KEYS * BLOCK);
        failed = !sc || !qt || !kf || !b;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            if (failed)
                continue;
            int64_t blk = u / spans, span = u % spans;
            int64_t bg = blk / blocks, bb = bg / kv_heads, g = bg % kv_heads, i0 = blk % blocks * BLOCK;
            int64_t rows = length - i0 < BLOCK ? length - i0 : BLOCK;
            const char *kb = (const char *)k + size * (bb * kst[0] + g * kst[1]);
            const char *vb = (const char *)v + size * (bb * vst[0] + g * vst[1]);
            int32_t n_of[BLOCK] = {0};
            const int32_t *index;
            int64_t n = unit_keys(pos + bb * ranked, upto + bb * ranked, keys - length + i0, rows, span, &index,
                                  n_of, count + (bg * length + i0) * spans + span, spans);
            /* row j's partial result for this span: each head's max, sum and weighted values */
#define RES(j) (partial + ((bg * length + i0 + (j)) * spans + span) * part)
            if (!n)
                continue;
            ivec nv = iload(n_of);
#ifdef __AVX512BF16__
            if (pair_scores(bf16, dim))
                block_pairs(q, qst, bb, g, group, i0, rows, dim, kb, kst[2], index, n, scale, nv, sc, qt, b);
            else
#endif
                block_floats(bf16, q, qst, bb, g, group, i0, rows, dim, kb, kst[2], index, n, scale, nv, sc, qt, kf, b);
            for (int64_t h = 0; h < group; h++) {
                vec top, sum;
                block_softmax(sc + h * SPAN * BLOCK, n, nv, &top, &sum);
                for (int64_t j = 0; j < rows; j++) {
                    RES(j)[h * (dim + 2)] = ((const float *)&top)[j];
                    RES(j)[h * (dim + 2) + 1] = ((const float *)&sum)[j];
                }
            }
            /* the weighted values, two rows at a time, VALUE_KEYS keys a pass (they stay in L1 while
               the block's rows pass) */
            for (int64_t t0 = 0; t0 < n; t0 += VALUE_KEYS)
                for (int64_t j = 0; j < rows; j += 2) {
                    int64_t R = rows - j < 2 ? rows - j : 2, own[2] = {n_of[j], R > 1 ? n_of[j + 1] : 0};
                    int64_t to = t0 + VALUE_KEYS < n ? t0 + VALUE_KEYS : n;
                    if (own[R - 1] <= t0)
                        continue;
                    for (int64_t h = 0; h < group; h += 3) {
                        int64_t G = group - h < 3 ? group - h : 3;
                        float *at[2] = {RES(j) + h * (dim + 2), R > 1 ? RES(j + 1) + h * (dim + 2) : NULL};
#define PV(R_, G_, C_) block_values(vb, vst[2], index, t0, to, !t0, own, sc + h * SPAN * BLOCK + j, bf16, size, \
                                    R_, G_, C_, at, dim + 2)
                        if (LANES == 8 && nc % 2 == 0)   /* AVX2: the two rows, up to 3 heads and 16 dims at a time */
                            for (int64_t d0 = 0; d0 < dim; d0 += 16) {
                                float *part[2] = {at[0] + d0, R > 1 ? at[1] + d0 : NULL};
#define STRETCH(R_, G_) block_values(vb + size * d0, vst[2], index, t0, to, !t0, own, sc + h * SPAN * BLOCK + j, \
                                     bf16, size, R_, G_, 2, part, dim + 2)
                                if (R == 2 && G == 3) STRETCH(2, 3);
                                else if (R == 2 && G == 2) STRETCH(2, 2);
                                else if (R == 2) STRETCH(2, 1);
                                else if (G == 3) STRETCH(1, 3);
                                else if (G == 2) STRETCH(1, 2);
                                else STRETCH(1, 1);
#undef STRETCH
                            }
                        else if (nc == 4 && R == 2 && G == 3) PV(2, 3, 4);
                        else if (nc == 4 && R == 2 && G == 2) PV(2, 2, 4);
                        else if (nc == 4 && R == 2) PV(2, 1, 4);
                        else for (int64_t x = 0; x < G; x++)   /* other shapes: a row and head at a time */
                            for (int64_t r = 0; r < R; r++) {
                                float *one[2] = {at[r] + x * (dim + 2), NULL};
                                int64_t only[2] = {own[r], 0};
                                block_values(vb, vst[2], index, t0, to, !t0, only, sc + (h + x) * SPAN * BLOCK + j + r, bf16,
                                             size, 1, 1, nc, one, dim + 2);
                            }
#undef PV
                    }
                }
            for (int64_t j = 0; spans == 1 && j < rows; j++)   /* a row's only span: joined here */
                for (int64_t h = 0; n_of[j] && h < group; h++)
                    join(RES(j) + h * (dim + 2), n_of + j, 1, part, dim, bf16,
                         (char *)out + size * (((bb * length + i0 + j) * kv_heads * group + g * group + h) * dim));
#undef RES
        }
        free(sc);
        free(qt);
        free(kf);
        free(b);
    }
    return failed ? -1 : 0;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
/* AMX (Sapphire Rapids and later; attention.py compiles this part where the CPU has amx_tile,
 * amx_bf16 and AVX512-BF16): bfloat16 attention on the tiles, for a prompt's rows and a lone row
 * alike. A unit is up to 16 / group query rows of one key/value head (a tile's 16 rows: each
 * row's `group` heads) and a span of keys:
 * - the scores: tdpbf16ps of 16 keys (the tile's rows, read from the cache as stored) by the
 *   unit's queries (transposed once per unit), 32 dims at a time, into float32; then
 *   transposed, so that each (row, head) has its scores in a row, times the scale;
 * - each (row, head)'s softmax over its own keys (softmax(), as on the vector path);
 * - the weighted values: each weight as two bfloat16s, its rounding and what that left out (16 of
 *   its 24 bits: with the first alone, as torch's bfloat16 attention rounds them, SmolLM2's
 *   greedy answers changed where the vector path's had held, e.g. "The capital of France is
 *   Paris" became "L'Etoile..." on a near tie; the second costs the attention ~12% at 512
 *   tokens), each by tdpbf16ps on the values, 32 keys at a time, two keys' values interleaved
 *   per dim, into float32 sums per (row, head) and 16 dims.
 * Every product of a tile's element depends only on its row and column, so a row's bits are the
 * same alone or in a block with others (keys another row reads and it does not weigh exactly 0:
 * adding 0 leaves a sum as it is, and a sum that starts at +0 is never -0). The order of the
 * sums is the tiles', not the vector path's: other bits (the same for every call here; 0.1-0.2% of
 * the bfloat16 outputs differ from the vector path's, against 20-40% with the weights' first
 * bfloat16 alone). A 512-token prompt's attention ran ~2.3x faster than on the vectors. */
#include <sys/syscall.h>
#include <unistd.h>

static int amx_ready;

/* Linux gives a process the tiles' state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM,
   XFEATURE_XTILEDATA): 1 when granted (then bfloat16 attention runs on the tiles), else 0 */
int attention_amx(void) {
    amx_ready = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return amx_ready;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* A block of 16 keys for the tiles (the ranks' positions in index[t .. t + 16), n in all): in
   place in the cache where they are 16 consecutive positions, else copied into buf (the keys
   past n 0). Sets *at and *stride (bytes). */
static inline void key_rows(const char *kb, int64_t kstride, const int32_t *index, int64_t t, int64_t n,
                            int64_t dim, uint16_t buf[16][128], const char **at, int64_t *stride) {
    if (t + 16 <= n && index[t + 15] == index[t] + 15) {
        *at = kb + 2 * index[t] * kstride;
        *stride = 2 * kstride;
        return;
    }
    for (int64_t x = 0; x < 16; x++)
        if (t + x < n) memcpy(buf[x], kb + 2 * index[t + x] * kstride, (size_t)(2 * dim));
        else memset(buf[x], 0, (size_t)(2 * dim));
    *at = (const char *)buf;
    *stride = sizeof buf[0];
}

/* the units of attend() on the tiles: partial and count per (row, span) as attend's loop writes
   them, and out for a row whose keys are one span. dim: a multiple of 32, at most 128. */
static void amx_units(const void *q, const void *k, const void *v, const int64_t *st, int64_t batch,
                      int64_t kv_heads, int64_t group, int64_t length, int64_t keys, int64_t dim,
                      const int32_t *pos, const int32_t *upto, int64_t ranked, float scale, int64_t spans,
                      float *partial, int32_t *count, void *out, int nt) {
    const int64_t *qst = st, *kst = st + 3, *vst = st + 6;
    const int64_t per = 16 / group, blocks = (length + per - 1) / per, part = group * (dim + 2);
    const int64_t units = batch * kv_heads * blocks * spans, chunks = dim / 32;
    #pragma omp parallel num_threads(nt)
    {
        struct tile_config c;
        memset(&c, 0, sizeof c);
        c.palette = 1;
        for (int t = 0; t < 8; t++) {   /* every tile 16 rows of 64 bytes */
            c.rows[t] = 16;
            c.colsb[t] = 64;
        }
        _tile_loadconfig(&c);
        int32_t n_of[16];
        float score[16][SPAN + LANES], sums[4][16][16];
        uint16_t weights[16][SPAN], rest[16][SPAN], kbuf[2][16][128], pairs[4][16][32];
        uint32_t qt[4][16][16];   /* the queries, 32 dims at a time: [dim pair][tile row] */
        /* words 0-15 of two keys' values interleaved (dim d of the first, then of the second) */
        const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
        const __m512 sc = _mm512_set1_ps(scale);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            int64_t blk = u / spans, span = u % spans;
            int64_t bg = blk / blocks, b = bg / kv_heads, g = bg % kv_heads, i0 = blk % blocks * per;
            int64_t rows = length - i0 < per ? length - i0 : per, m_used = rows * group;
            const char *kb = (const char *)k + 2 * (b * kst[0] + g * kst[1]);
            const char *vb = (const char *)v + 2 * (b * vst[0] + g * vst[1]);
            /* tile row m's partial result for this span: its row's (bg * length + i0 + m / group),
               its head's (m % group) max, sum and weighted values */
#define RES(m) (partial + ((bg * length + i0 + (m) / group) * spans + span) * part + (m) % group * (dim + 2))
            const int32_t *index;
            int64_t n = unit_keys(pos + b * ranked, upto + b * ranked, keys - length + i0, rows, span, &index,
                                  n_of, count + (bg * length + i0) * spans + span, spans);
            if (!n)
                continue;
            for (int64_t x = 0; x < chunks; x++) {   /* tile row m: row m / group, head m % group */
                __m512 col[16];
                for (int64_t m = 0; m < 16; m++)
                    col[m] = m < m_used ? _mm512_loadu_ps((const char *)q + 2 * (b * qst[0] + (g * group + m % group) * qst[1]
                                                                              + (i0 + m / group) * qst[2] + 32 * x))
                                        : _mm512_setzero_ps();
                transpose16(col);   /* dword p of each row's 32 dims: their pair p */
                for (int p = 0; p < 16; p++) _mm512_storeu_ps(qt[x][p], col[p]);
            }
            _tile_loadd(2, qt[0], 64);
            if (chunks > 1) _tile_loadd(3, qt[1], 64);
            if (chunks > 2) _tile_loadd(4, qt[2], 64);
            if (chunks > 3) _tile_loadd(5, qt[3], 64);
            for (int64_t t = 0; t < n; t += 32) {   /* scores: two blocks of 16 keys x the tile's rows */
                const char *at[2] = {0, 0};
                int64_t stride[2] = {0, 0}, two = t + 16 < n;
                key_rows(kb, kst[2], index, t, n, dim, kbuf[0], &at[0], &stride[0]);
                if (two) key_rows(kb, kst[2], index, t + 16, n, dim, kbuf[1], &at[1], &stride[1]);
                _tile_zero(0);
                _tile_zero(7);
#define SCORES(x, qtile) do { \
                    _tile_loadd(1, at[0] + 64 * (x), stride[0]); \
                    _tile_dpbf16ps(0, 1, qtile); \
                    if (two) { _tile_loadd(6, at[1] + 64 * (x), stride[1]); _tile_dpbf16ps(7, 6, qtile); } \
                } while (0)
                SCORES(0, 2);
                if (chunks > 1) SCORES(1, 3);
                if (chunks > 2) SCORES(2, 4);
                if (chunks > 3) SCORES(3, 5);
#undef SCORES
                _tile_stored(0, sums[0], 64);   /* [key][tile row] */
                if (two) _tile_stored(7, sums[1], 64);
                for (int64_t y = 0; y <= two; y++) {
                    float *to = &score[0][t + 16 * y];
                    if (m_used > 4) {
                        __m512 col[16];
                        for (int x = 0; x < 16; x++) col[x] = _mm512_loadu_ps(sums[y][x]);
                        transpose16(col);
                        for (int64_t m = 0; m < m_used; m++) _mm512_storeu_ps(to + m * (SPAN + LANES), _mm512_mul_ps(col[m], sc));
                    } else {   /* a lone row: its heads' columns alone */
                        const __m512i at16 = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
                        for (int64_t m = 0; m < m_used; m++)
                            _mm512_storeu_ps(to + m * (SPAN + LANES), _mm512_mul_ps(_mm512_i32gather_ps(
                                _mm512_add_epi32(at16, _mm512_set1_epi32((int)m)), &sums[y][0][0], 4), sc));
                    }
                }
            }
            int64_t padded = (n + 31) / 32 * 32;
            for (int64_t m = 0; m < m_used; m++) {   /* each (row, head)'s weights, as two bfloat16s */
                int64_t own = n_of[m / group];
                if (own) softmax(score[m], own, RES(m));
                for (int64_t t = 0; t < padded; t += 32) {
                    __mmask16 k0 = (__mmask16)(own - t >= 16 ? 0xffff : own > t ? (1u << (own - t)) - 1 : 0);
                    __mmask16 k1 = (__mmask16)(own - t >= 32 ? 0xffff : own > t + 16 ? (1u << (own - t - 16)) - 1 : 0);
                    __m512 x0 = _mm512_maskz_loadu_ps(k0, &score[m][t]), x1 = _mm512_maskz_loadu_ps(k1, &score[m][t + 16]);
                    __m512bh w = _mm512_cvtne2ps_pbh(x1, x0);
                    /* what bfloat16 left out: a second bfloat16 (the two hold 16 of the weight's 24 bits) */
                    __m512bh r = _mm512_cvtne2ps_pbh(
                        _mm512_sub_ps(x1, _mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64((__m512i)w, 1))),
                        _mm512_sub_ps(x0, _mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256((__m512i)w))));
                    _mm512_storeu_si512(&weights[m][t], (__m512i)w);
                    _mm512_storeu_si512(&rest[m][t], (__m512i)r);
                }
            }
            for (int64_t d0 = 0; d0 < dim; d0 += 64) {   /* the weighted values, 64 dims at a time */
                int64_t wide = dim - d0 >= 64;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t t = 0; t < padded; t += 32) {   /* 32 keys: 16 pairs x 16 dims a tile */
                    for (int kp = 0; kp < 16; kp++)
                        for (int64_t x = 0; x <= wide; x++) {
                            int64_t t0 = t + 2 * kp, off = d0 + 32 * x;
                            __m512i a = t0 < n ? _mm512_loadu_si512(vb + 2 * (index[t0] * vst[2] + off)) : _mm512_setzero_si512();
                            __m512i e = t0 + 1 < n ? _mm512_loadu_si512(vb + 2 * (index[t0 + 1] * vst[2] + off)) : _mm512_setzero_si512();
                            _mm512_storeu_si512(pairs[2 * x][kp], _mm512_permutex2var_epi16(a, lo, e));
                            _mm512_storeu_si512(pairs[2 * x + 1][kp], _mm512_permutex2var_epi16(a, hi, e));
                        }
                    _tile_loadd(4, &weights[0][t], sizeof weights[0]);
                    _tile_loadd(5, &rest[0][t], sizeof rest[0]);
                    /* sums tile c (dims d0 + 16c ..) += both weights' tiles times pairs[c] in tile b */
#define VALUES(c, b) do { _tile_loadd(b, pairs[c], 64); _tile_dpbf16ps(c, 4, b); _tile_dpbf16ps(c, 5, b); } while (0)
                    VALUES(0, 6);
                    VALUES(1, 7);
                    if (wide) {
                        VALUES(2, 6);
                        VALUES(3, 7);
                    }
#undef VALUES
                }
                _tile_stored(0, sums[0], 64);
                _tile_stored(1, sums[1], 64);
                if (wide) {
                    _tile_stored(2, sums[2], 64);
                    _tile_stored(3, sums[3], 64);
                }
                for (int64_t m = 0; m < m_used; m++) {
                    float *res = RES(m) + 2 + d0;
                    for (int64_t x = 0; x < 2 + 2 * wide; x++) _mm512_storeu_ps(res + 16 * x, _mm512_loadu_ps(sums[x][m]));
                }
            }
            for (int64_t m = 0; spans == 1 && m < m_used; m++)   /* a row's only span: joined here */
                join(RES(m), count + bg * length + i0 + m / group, 1, part, dim, 1,
                     (uint16_t *)out + ((b * length + i0 + m / group) * kv_heads * group + g * group + m % group) * dim);
#undef RES
        }
        _tile_release();
    }
}
#endif

/* q [batch, heads, length, dim], k and v [batch, kv_heads, keys, dim] (any strides, in
   elements: st holds q's first three, then k's, then v's; last dimension contiguous), mask [batch, keys]
   (nonzero: a key of the row's sequence) or NULL; query row i sees keys up to
   keys - length + i. out [batch, length, heads, dim], contiguous, in the inputs' dtype.
   dim: a multiple of 16, at most 256; heads / kv_heads at most MAXG. Returns 0, or -1 when
   scratch memory could not be allocated. */
int attend(int bf16, const void *q, const void *k, const void *v, const int64_t *st,
           int64_t batch, int64_t heads, int64_t kv_heads, int64_t length, int64_t keys,
           int64_t dim, const uint8_t *mask, float scale, void *out, int nt) {
    const int64_t *qst = st, *kst = st + 3, *vst = st + 6;
    const int64_t size = bf16 ? 2 : 4, group = heads / kv_heads, spans = (keys + SPAN - 1) / SPAN;
    const int64_t rows = batch * kv_heads * length, units = rows * spans, nc = dim / LANES;
    const int64_t part = group * (dim + 2);          /* per unit: each head's max, sum, sums */
    /* rank_keys' tables: a sequence's `ranked` apart, or one for all of them without a mask */
    const int64_t ranked = mask ? keys : 0, tables = mask ? batch : 1;
    float *partial = malloc(sizeof(float) * (size_t)(units * part));
    int32_t *count = malloc(sizeof(int32_t) * (size_t)units);
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)(2 * tables * keys));
    if (!partial || !count || !pos) {
        free(partial);
        free(count);
        free(pos);
        return -1;
    }
    int32_t *upto = pos + tables * keys;
    rank_keys(mask, tables, keys, pos, upto);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    if (amx_ready && bf16 && dim % 32 == 0 && dim <= 128) {
        amx_units(q, k, v, st, batch, kv_heads, group, length, keys, dim, pos, upto, ranked, scale, spans,
                  partial, count, out, nt);
    } else
#endif
    if (length >= BLOCK) {
        if (block_units(bf16, q, k, v, st, batch, kv_heads, group, length, keys, dim, pos, upto, ranked, scale,
                        spans, partial, count, out, nt)) {
            free(partial);
            free(count);
            free(pos);
            return -1;
        }
    } else
    /* round robin over the rows, span by span: a prompt's rows see more keys the later they are,
       and contiguous shares gave one thread the long ones (prefill of 512 tokens 4% faster);
       taken row by row, a row's spans in turn, two threads and two spans gave the first thread
       every first span and the second every second, which a prompt's first half has none of (a
       1,024-token prefill: the first thread did 3/4 of the attention while the other waited) */
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int64_t x = 0; x < units; x++) {
        int64_t r = x % rows, span = x / rows, u = r * spans + span;
        int64_t b = r / (kv_heads * length), g = r / length % kv_heads, i = r % length;
        const char *kb = (const char *)k + size * (b * kst[0] + g * kst[1]);
        const char *vb = (const char *)v + size * (b * vst[0] + g * vst[1]);
        const int32_t *index;   /* the span: the row's keys ranked span * SPAN on */
        int64_t n = span_keys(pos + b * ranked, upto + b * ranked, span, keys - length + i, &index);
        float score[MAXG][SPAN + LANES];
        count[u] = (int32_t)n;
        float *res = partial + u * part;
        if (!n)
            continue;
        {   /* the scores */
            const char *qrow = (const char *)q + size * (b * qst[0] + g * group * qst[1] + i * qst[2]);
#define SC(G, C) scores(qrow, qst[1], kb, kst[2], index, n, bf16, size, G, C, dim, scale, \
                        (float *)score, SPAN + LANES)
            SHAPES(SC);
#undef SC
        }
        for (int64_t h = 0; h < group; h++) softmax(score[h], n, res + h * (dim + 2));
        /* the weighted values: each value read once for the group */
#define PV(G, C) weighted(vb, vst[2], index, n, (float *)score, SPAN + LANES, bf16, size, G, C, \
                          res, dim + 2)
        SHAPES(PV);
#undef PV
        for (int64_t h = 0; spans == 1 && h < group; h++)   /* the row's only span: joined here */
            join(res + h * (dim + 2), count + u, 1, part, dim, bf16,
                 (char *)out + size * (((b * length + i) * heads + g * group + h) * dim));
    }
    /* join a row's spans, per head (a row of one span with keys was joined by its unit: then
       only rows without keys are left, on this thread) */
    FOR_SPLIT(spans > 1 && rows * group > 8, x, rows * group,
        int64_t r = x / group, h = x % group;
        int64_t b = r / (kv_heads * length), g = r / length % kv_heads, i = r % length;
        if (spans == 1 && count[r])   /* joined by its unit */
            continue;
        join(partial + r * spans * part + h * (dim + 2), count + r * spans, spans, part, dim, bf16,
             (char *)out + size * (((b * length + i) * heads + g * group + h) * dim));
    );
    free(partial);
    free(count);
    free(pos);
    return 0;
}
