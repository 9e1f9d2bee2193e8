/* llmhost's int4 CPU kernel: GGUF Q4_0 / Q4_1 weights times 8-bit activations on AVX2.
 *
 * The scheme is llama.cpp's for a CPU without native bfloat16: each row of
 * activations is quantized per block of 32 (int8, one float scale), and a
 * block's dot product with a weight block is exact integer arithmetic
 * (vpmaddubsw: unsigned 4-bit weight times signed 8-bit activation), scaled
 * once per block. Weights stay as the file stores them: per output feature and
 * block of 32 inputs, 16 bytes of nibbles (byte j: input j in the low nibble,
 * input j + 16 in the high one) and two float16s, w = d * q + m (Q4_0 is
 * d * (q - 8): m = -8 d). quantize.py builds the layout and says why this file
 * exists; q4kernel.py compiles it at the first int4 load and calls it.
 *
 * Two blocks at a time: one 32-byte load holds a pair of weight blocks, its
 * low nibbles inputs 0-15 of both, its high nibbles inputs 16-31. The
 * activations are stored in the same order (per pair of blocks: inputs 0-15 of
 * each, then 16-31 of each), so a pair costs two vpmaddubsw, one vpmaddwd and
 * one multiply-add (a last odd block is stored and computed alone).
 *
 * Every row of a product is computed by the same sequence of operations,
 * however many rows a call has: a row's result does not depend on what it is
 * batched with. Threads: OpenMP's, shared with torch's (the same libgomp).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* One block of 32 floats -> 32 int8 in input order; *d its scale, *s scale * sum(q). */
static inline __m256i quantize_block(const float *p, float *d, float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int j = 0; j < 32; j += 8)
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + j)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; j++)
        q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p + 8 * j), inv),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    *d = amax / 127.0f;
    *s = *d * (float)_mm_cvtsi128_si32(s4);
    /* packs interleave the 128-bit lanes; the permute puts the 32 bytes back in order */
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* x [m, k] float32 -> xq int8 [m, k] in pair order (above), xd (scale) and xs (scale * sum
   of the block's q) float [m, k / 32]. */
static void quantize_rows(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd, float *xs,
                          int nt) {
    int64_t nb = k / 32, pairs = m * (nb / 2);
    #pragma omp parallel for num_threads(nt) schedule(static) if (pairs > 1024)
    for (int64_t i = 0; i < pairs; i++) {
        int64_t row = i / (nb / 2), b = row * nb + 2 * (i % (nb / 2));
        __m256i a = quantize_block(x + b * 32, xd + b, xs + b);
        __m256i c = quantize_block(x + b * 32 + 32, xd + b + 1, xs + b + 1);
        _mm256_storeu_si256((__m256i *)(xq + b * 32), _mm256_permute2x128_si256(a, c, 0x20));
        _mm256_storeu_si256((__m256i *)(xq + b * 32 + 32), _mm256_permute2x128_si256(a, c, 0x31));
    }
    if (nb % 2)
        for (int64_t row = 0; row < m; row++) {
            int64_t b = row * nb + nb - 1;
            _mm256_storeu_si256((__m256i *)(xq + b * 32), quantize_block(x + b * 32, xd + b, xs + b));
        }
}

/* x [m, k] as the kernel sees it (its 8-bit blocks, back in float32, input order), for a
   prefill's dense matmul: the same products as the kernel's, to float32 rounding. */
void q4_requantize(const float *x, int64_t m, int64_t k, float *out, int nt) {
    int64_t blocks = m * (k / 32);
    #pragma omp parallel for num_threads(nt) schedule(static) if (blocks > 2048)
    for (int64_t b = 0; b < blocks; b++) {
        float d, s;
        int8_t q[32];
        _mm256_storeu_si256((__m256i *)q, quantize_block(x + b * 32, &d, &s));
        for (int j = 0; j < 32; j++) out[b * 32 + j] = d * (float)q[j];
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* VNNI (q4kernel.py compiles with it where the CPU has AVX-VNNI or AVX512-VNNI with VL):
   vpdpbusd adds four unsigned x signed byte products into each int32 lane in one
   instruction, the integers vpmaddubsw + vpmaddwd give below (no sum here saturates 16
   bits), so both builds compute the same results bit for bit. */
#if defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#endif

/* int32 sums of four adjacent products u * s (u unsigned, s signed bytes), into lanes */
static inline __m256i dot4(__m256i u, __m256i s) {
#ifdef DPBUSD
    return DPBUSD(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* 8 int32 partial sums of a pair of blocks (lanes 0-3: the first block, 4-7: the second) of
   unsigned weights w0 (inputs 0-15 of each) and w1 (16-31) with activations y (pair order) */
static inline __m256 pair_dot(__m256i w0, __m256i w1, const int8_t *y) {
    __m256i y0 = _mm256_loadu_si256((const __m256i *)y), y1 = _mm256_loadu_si256((const __m256i *)(y + 32));
#ifdef DPBUSD
    return _mm256_cvtepi32_ps(DPBUSD(DPBUSD(_mm256_setzero_si256(), w0, y0), w1, y1));
#else
    /* each 16-bit sum is at most 2 * 15 * 127 per vpmaddubsw: the two add without overflow */
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, y0), _mm256_maddubs_epi16(w1, y1));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

/* One Q4 output feature (wq, wd, wm) against `rows` (1..4, a constant where inlined) rows of
   quantized activations; out[r * ostride] = the row's dot product. */
static inline __attribute__((always_inline)) void feature(
        const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t nb, const int8_t *xq,
        const float *xd, const float *xs, int64_t k, int rows, float *out, int64_t ostride) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i first = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i second = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    __m256 acc[4][2];
    __m128 macc[4];
    float tail[4];
    for (int r = 0; r < 4; r++) {
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        macc[r] = _mm_setzero_ps();
        tail[r] = 0.0f;
    }
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {   /* two pairs */
        __m256i wa = _mm256_loadu_si256((const __m256i *)(wq + b * 16));
        __m256i wb = _mm256_loadu_si256((const __m256i *)(wq + b * 16 + 32));
        __m256i a0 = _mm256_and_si256(wa, low), a1 = _mm256_and_si256(_mm256_srli_epi16(wa, 4), low);
        __m256i b0 = _mm256_and_si256(wb, low), b1 = _mm256_and_si256(_mm256_srli_epi16(wb, 4), low);
        __m128 dw = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(wd + b)));
        __m128 mw = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(wm + b)));
        for (int r = 0; r < rows; r++) {
            const int8_t *y = xq + r * k + b * 32;
            __m256 sc = _mm256_castps128_ps256(_mm_mul_ps(dw, _mm_loadu_ps(xd + r * nb + b)));
            macc[r] = _mm_fmadd_ps(mw, _mm_loadu_ps(xs + r * nb + b), macc[r]);
            acc[r][0] = _mm256_fmadd_ps(pair_dot(a0, a1, y), _mm256_permutevar8x32_ps(sc, first), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(pair_dot(b0, b1, y + 64), _mm256_permutevar8x32_ps(sc, second),
                                        acc[r][1]);
        }
    }
    for (; b < nb; b++) {   /* a last pair, a last odd block */
        int pair = b + 1 < nb;
        __m256i w;
        if (pair) {
            w = _mm256_loadu_si256((const __m256i *)(wq + b * 16));
        } else {
            __m128i raw = _mm_loadu_si128((const __m128i *)(wq + b * 16));
            w = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        }
        __m256i w0 = _mm256_and_si256(w, low), w1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
        for (int r = 0; r < rows; r++) {
            const int8_t *y = xq + r * k + b * 32;
            float s0 = _cvtsh_ss(wd[b]) * xd[r * nb + b];
            tail[r] += _cvtsh_ss(wm[b]) * xs[r * nb + b];
            if (pair) {
                float s1 = _cvtsh_ss(wd[b + 1]) * xd[r * nb + b + 1];
                tail[r] += _cvtsh_ss(wm[b + 1]) * xs[r * nb + b + 1];
                acc[r][0] = _mm256_fmadd_ps(pair_dot(w0, w1, y), _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1),
                                            acc[r][0]);
            } else {
                acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4(w0, _mm256_loadu_si256((const __m256i *)y))),
                                            _mm256_set1_ps(s0), acc[r][0]);
            }
        }
        b += pair;
    }
    for (int r = 0; r < rows; r++) {
        __m128 s = macc[r];
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        out[r * ostride] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + _mm_cvtss_f32(s) + tail[r];
    }
}

/* Q8_0 weights (a file's token embedding, tied to the output head): int8 [n, k] in input
   order and one float16 scale per block of 32. vpmaddubsw wants an unsigned operand: |w|
   times y with w's sign; two products of up to 2 * 128 * 127 do not add in 16 bits, so each
   is widened alone. One feature against 1..4 rows, as feature() above. */
static inline __attribute__((always_inline)) void feature8(
        const int8_t *wq, const uint16_t *wd, int64_t nb, const int8_t *xq, const float *xd,
        int64_t k, int rows, float *out, int64_t ostride) {
    __m256 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        int pair = b + 1 < nb;
        __m256i w0, w1 = _mm256_setzero_si256();
        __m256i a = _mm256_loadu_si256((const __m256i *)(wq + b * 32));
        if (pair) {   /* to pair order: inputs 0-15 of both blocks, then 16-31 of both */
            __m256i c = _mm256_loadu_si256((const __m256i *)(wq + b * 32 + 32));
            w0 = _mm256_permute2x128_si256(a, c, 0x20);
            w1 = _mm256_permute2x128_si256(a, c, 0x31);
        } else {
            w0 = a;
        }
        float d0 = _cvtsh_ss(wd[b]), d1 = pair ? _cvtsh_ss(wd[b + 1]) : 0.0f;
        for (int r = 0; r < rows; r++) {
            const int8_t *y = xq + r * k + b * 32;
            __m256i p = dot4(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)y), w0));
            float s0 = d0 * xd[r * nb + b];
            if (pair) {
                p = _mm256_add_epi32(p, dot4(_mm256_sign_epi8(w1, w1),
                                             _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(y + 32)), w1)));
                float s1 = d1 * xd[r * nb + b + 1];
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1),
                                         acc[r]);
            } else {
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s0), acc[r]);
            }
        }
        b += pair;
    }
    for (int r = 0; r < rows; r++) out[r * ostride] = hsum(acc[r]);
}

/* out [m, n] float32 = x [m, k] float32 (quantized here) times w^T, w [n, k]: a Q4 weight
   (bits 4: qs uint8 [n, k / 2], d and mn float16 [n, k / 32]) or a Q8_0 one (bits 8: qs int8
   [n, k], d; mn unused). Threads split the features; a feature's rows go four at a time.
   Returns 0, or -1 when the activations' scratch memory could not be allocated. */
int q_linear(int bits, const float *x, int64_t m, int64_t k, const void *qs, const uint16_t *d,
             const uint16_t *mn, int64_t n, float *out, int nt) {
    int64_t nb = k / 32;
    int8_t *xq = malloc((size_t)(m * k));
    float *xd = malloc(sizeof(float) * (size_t)(m * nb)), *xs = malloc(sizeof(float) * (size_t)(m * nb));
    if (!xq || !xd || !xs) {
        free(xq);
        free(xd);
        free(xs);
        return -1;
    }
    quantize_rows(x, m, k, xq, xd, xs, nt);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t f = 0; f < n; f++)
        for (int64_t r = 0; r < m; r += 4) {
            /* a constant row count per call: each variant keeps its sums in registers */
#define FEATURE(rows) do { if (bits == 4) \
                feature((const uint8_t *)qs + f * (k / 2), d + f * nb, mn + f * nb, nb, xq + r * k, \
                        xd + r * nb, xs + r * nb, k, rows, out + r * n + f, n); \
            else feature8((const int8_t *)qs + f * k, d + f * nb, nb, xq + r * k, xd + r * nb, k, \
                          rows, out + r * n + f, n); } while (0)
            switch (m - r) {
            case 1: FEATURE(1); break;
            case 2: FEATURE(2); break;
            case 3: FEATURE(3); break;
            default: FEATURE(4);
            }
#undef FEATURE
        }
    free(xq);
    free(xd);
    free(xs);
    return 0;
}

/* w [n, k] float32: a Q4 weight's values, d * q + m, for a prefill's dense matmul */
void q4_dequantize(const uint8_t *qs, const uint16_t *d, const uint16_t *mn, int64_t n, int64_t k,
                   float *w, int nt) {
    int64_t blocks = n * (k / 32);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < blocks; i++) {
        const __m256 db = _mm256_set1_ps(_cvtsh_ss(d[i])), mb = _mm256_set1_ps(_cvtsh_ss(mn[i]));
        __m128i raw = _mm_loadu_si128((const __m128i *)(qs + i * 16));
        __m128i halves[2] = {_mm_and_si128(raw, _mm_set1_epi8(0x0F)),
                             _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F))};
        for (int h = 0; h < 2; h++) {
            __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[h]));
            __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8)));
            _mm256_storeu_ps(w + i * 32 + 16 * h, _mm256_fmadd_ps(a, db, mb));
            _mm256_storeu_ps(w + i * 32 + 16 * h + 8, _mm256_fmadd_ps(c, db, mb));
        }
    }
}
