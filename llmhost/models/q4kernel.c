/* llmhost's int4 CPU kernel: GGUF Q4_0 / Q4_1 weights times 8-bit activations on AVX2.
 *
 * The scheme is llama.cpp's for a CPU without native bfloat16: each row of
 * activations is quantized per block of 32 (int8, one float scale), and a
 * block's dot product with a weight block is exact integer arithmetic
 * (vpmaddubsw: unsigned 4-bit weight times signed 8-bit activation), scaled
 * once per block. Weights stay as the file stores them: per output feature and
 * block of 32 inputs, 16 bytes of nibbles (byte j: input j in the low nibble,
 * input j + 16 in the high one) and two float16s, w = d * q + m (Q4_0 is
 * d * (q - 8): its m plane is left out and m = -8 d computed, exactly, from d:
 * 2 bytes less per block to stream from memory, and a lone row is bound by
 * memory). quantize.py builds the layout and says why this file
 * exists; q4kernel.py compiles it at the first int4 load and calls it.
 *
 * Whole groups of 8 blocks (256 inputs), the bulk of a product, in "lane order": the
 * activations are stored so that each 4-byte lane of a vector holds 4 inputs of one block
 * (vector i, lane l: inputs 4i..4i+3 of the group's block GROUP_LANES[l]), and a group's 4
 * weight loads are transposed in registers into that order (8 unpacks, once per feature and
 * reused by the tile's rows; the file's layout is kept). 8 integer dot products then
 * accumulate into ONE int32 vector whose lanes are the 8 blocks' sums: no horizontal adds
 * (their removal alone: ~1.08x on multi-row products), one conversion per group.
 * The blocks after the last whole group (k not a multiple of 256) go two at a time in
 * "pair order": one 32-byte load holds a pair of weight blocks, its low nibbles inputs 0-15
 * of both, its high nibbles inputs 16-31; the activations are stored the same way (inputs
 * 0-15 of each, then 16-31 of each), a last odd block alone; each block's sum is then moved
 * into its lane of a group, so the rest is scaled as a partial group. Q8_0 (the output head)
 * uses pair order throughout.
 *
 * Every row of a product is computed by the same sequence of operations,
 * however many rows a call has: a row's result does not depend on what it is
 * batched with. Threads: OpenMP's, shared with torch's (the same libgomp).
 *
 * Paths by kind of CPU: on AVX2 (without VNNI, or with AVX-VNNI) the feature lanes
 * (q_linear_lanes: the weight packed at load, 8 features to a vector); on AVX-512 VNNI without
 * AMX the same feature lanes at 16 features (a prompt's rows on wide tiles over the weight
 * unpacked per call), the same bits as the AVX2 ones; with AMX the tiles below plus AMX tiles
 * for a prefill's rows (q_linear_amx), the same bits. The tiles also run where a weight's
 * features are not a multiple of the pack, and the Q8_0 head everywhere.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../engine/simd.h"

/* Block b of x (32 values, float32 or with `bf16` bfloat16: a bfloat16 model's activations read
   as they are, simd.h's load8; widened into a float32 copy first, a prompt's copy, 6 MB for
   SmolLM2's down projection at 1,024 rows, went through memory: 4% of its prefill) -> 32 int8
   in input order; *d its scale, *s scale * sum(q). */
static inline __m256i quantize_block(const void *x, int64_t b, int bf16, float *d, float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int j = 0; j < 32; j += 8)
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, load8(x, 32 * b + j, bf16)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; j++)
        q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(load8(x, 32 * b + 8 * j, bf16), inv),
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

/* Lane order's blocks: lane l of a group's vectors holds block GROUP_LANES[l] of the group's 8
   (the order the weights' transpose, group_weights, leaves them in) */
static const int GROUP_LANES[8] = {0, 2, 4, 6, 1, 3, 5, 7};

/* blocks from which quantize_rows splits its rows between the threads: a 40-token prompt's
   quantizing (2,048 blocks was the bound) ran on one thread while the other spun, 3% of its
   prefill (twentieth session); a decode step's few rows stay on one */
#define QUANTIZE_SPLIT_FROM 256

/* x [m, k] (float32, or bfloat16 with `bf16`) -> xq int8 [m, k], xd (scale) and xs (scale * sum
   of the block's q) float [m, k / 32]. xq's order: with `grouped` (Q4) each whole group of 8
   blocks in lane order (vector i of 32 bytes, lane l: inputs 4i..4i+3 of block GROUP_LANES[l])
   and the blocks after the last whole group in pair order; without it (Q8_0) pair order
   throughout. */
static void quantize_rows(const void *x, int bf16, int64_t m, int64_t k, int grouped, int8_t *xq, float *xd,
                          float *xs, int nt) {
    int64_t nb = k / 32, groups = grouped ? nb / 8 : 0, first = 8 * groups, pairs = (nb - first) / 2;
    FOR_SPLIT(m * groups * 8 >= QUANTIZE_SPLIT_FROM, i, m * groups,
        int64_t b = i / groups * nb + 8 * (i % groups);
        int32_t q[8][8], *out = (int32_t *)(xq + b * 32);   /* q[block][4 inputs] */
        for (int j = 0; j < 8; j++)
            _mm256_storeu_si256((__m256i *)q[j], quantize_block(x, b + j, bf16, xd + b + j, xs + b + j));
        for (int v = 0; v < 8; v++)
            for (int l = 0; l < 8; l++) out[8 * v + l] = q[GROUP_LANES[l]][v];
    );
    FOR_SPLIT(m * pairs * 2 >= QUANTIZE_SPLIT_FROM, i, m * pairs,
        int64_t b = i / pairs * nb + first + 2 * (i % pairs);
        __m256i a = quantize_block(x, b, bf16, xd + b, xs + b);
        __m256i c = quantize_block(x, b + 1, bf16, xd + b + 1, xs + b + 1);
        _mm256_storeu_si256((__m256i *)(xq + b * 32), _mm256_permute2x128_si256(a, c, 0x20));
        _mm256_storeu_si256((__m256i *)(xq + b * 32 + 32), _mm256_permute2x128_si256(a, c, 0x31));
    );
    if ((nb - first) % 2)
        for (int64_t row = 0; row < m; row++) {
            int64_t b = row * nb + nb - 1;
            _mm256_storeu_si256((__m256i *)(xq + b * 32), quantize_block(x, b, bf16, xd + b, xs + b));
        }
}

/* a packed Q8_0 weight's product (below, where the build has Q8_0 lanes) */
int q8_lanes_product(const void *x_in, int bf16, int64_t m, int64_t k, const uint8_t *qs,
                     const uint16_t *d, int64_t n, void *out, int nt);

/* x's first `blocks` blocks (float32, or bfloat16 with `bf16`) quantized in input order (xq:
   32-byte aligned), their scales and scale * sum (the feature lanes' activations) */
static inline void quantize_blocks(const void *x, int bf16, int64_t blocks, int8_t *xq, float *xd, float *xs,
                                   int nt) {
    FOR_SPLIT(blocks >= QUANTIZE_SPLIT_FROM, i, blocks,
              _mm256_store_si256((__m256i *)(xq + i * 32), quantize_block(x, i, bf16, xd + i, xs + i)););
}

/* x [m, k] as the kernel sees it (its 8-bit blocks, back in float32, input order), for a
   prefill's dense matmul: the same products as the kernel's, to float32 rounding. */
void q4_requantize(const float *x, int64_t m, int64_t k, float *out, int nt) {
    int64_t blocks = m * (k / 32);
    #pragma omp parallel for num_threads(nt) schedule(static) if (blocks > 2048)
    for (int64_t b = 0; b < blocks; b++) {
        float d, s;
        int8_t q[32];
        _mm256_storeu_si256((__m256i *)q, quantize_block(x, b, 0, &d, &s));
        for (int j = 0; j < 32; j++) out[b * 32 + j] = d * (float)q[j];
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* hsum of 8 vectors at once (a[0..7]): lane i is hsum(a[i]), the same adds of the same lanes
   in the same order (low half + high half, then lanes 0 + 2 and 1 + 3 of that, then those two),
   in 22 instructions instead of 8 x 7 */
static inline __m256 hsum8(const __m256 *a) {
    __m256 s[4], t[2];
    for (int i = 0; i < 4; i++)   /* [a[2i]'s lo + hi | a[2i + 1]'s] */
        s[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
    for (int i = 0; i < 2; i++)   /* [a[4i]: 0 + 2, 1 + 3, a[4i + 2]: .. | a[4i + 1], a[4i + 3]] */
        t[i] = _mm256_add_ps(_mm256_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44),
                             _mm256_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
    __m256 r = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], 0x88), _mm256_shuffle_ps(t[0], t[1], 0xDD));
    return _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));   /* a[0] .. a[7] */
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
static inline __m256i pair_dot(__m256i w0, __m256i w1, const int8_t *y) {
    __m256i y0 = _mm256_loadu_si256((const __m256i *)y), y1 = _mm256_loadu_si256((const __m256i *)(y + 32));
#ifdef DPBUSD
    return DPBUSD(DPBUSD(_mm256_setzero_si256(), w0, y0), w1, y1);
#else
    /* each 16-bit sum is at most 2 * 15 * 127 per vpmaddubsw: the two add without overflow */
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, y0), _mm256_maddubs_epi16(w1, y1));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

/* The tiled product. Per (row, feature) ONE float accumulator (8 lanes) takes, in this order:
   - each whole group of 8 blocks (group_dot): its 8 block sums, converted once, times the
     scales' vector dw * dx, then the offsets' term m * s of its 8 blocks (w = d * q + m);
   - the rest (k not a multiple of 256 inputs), a partial group: the same two steps, each of
     its blocks' sums in that block's lane of a group (rest_sums), the lanes without a block 0;
   and out = hsum(acc). (Before the seventeenth session the rest's blocks added 4 partial sums
   each, in llama.cpp's lanes: other bits. One sum per block lets the AMX tiles compute the rest
   as they compute a group.) That sequence depends only on k: a tile of R rows x F features runs
   it for each of its R * F (row, feature), each unpacked weight group used for R rows and
   each activation group (memory operands, from L1) for F features. Tiles of any shape, edge
   tiles included, so give a row the same bits alone or batched, at any thread count (llamafile's
   tinyBLAS tiles rows x features the same way; its blocks are added one at a time). */

/* Tiles: up to TILE_R rows x TILE_F features; which shapes run is TILE_R (rows) and
   tile_features' choice (below). AVX-512VL builds (q4kernel.py's choice where the CPU has
   AVX512-VNNI) have 32 vector registers, the others 16. q_linear's whole Q4 tiles take up to
   TALL_R rows (whole_rows), a group's weights unpacked once for more of them: 16 with 32
   registers; 8 in the AVX2 build without VNNI, whose groups go a weight vector at a time
   (q4_group), so that 8 rows' sums fit in its 16 registers. */
#if defined(__AVX512VL__)
#define TILE_R 6
#define TALL_R 16
#elif defined(DPBUSD)
#define TILE_R 4
#define TALL_R 4
#else
#define TILE_R 4
#define TALL_R 8
#endif
#define TILE_F 4

/* Rows of q_linear's whole Q4 tiles for k inputs: 16 or 12 where their activations (k bytes a
   row) stay within 24 KB, half of L1, beside the weights' stream (the bound SLICE keeps); else
   TILE_R. One thread, 16 rows against 6: SmolLM2's products (k = 576 and 1,536) ran 1.13-1.16x
   faster at 512 rows, 1.10x at 128, 1.07-1.08x at 40 (12 rows there: 1.05-1.08x, 10: 1.05x, 8:
   0.93x); the 1B model's (k = 2,048) 0.83-0.93x at 40 and 128 rows in 16-row tiles, and in 12-row
   ones 1.20x, 1.03x and 1.02x at 512, 128 and 40 (twenty-first session, Ice Lake). The AVX2
   build: 8 rows against 4, SmolLM2's k ran 1.2x as fast at 512 rows (10 and 12: no faster; 12
   slower at k = 1,536: twenty-seventh). */
static int whole_rows(int64_t k) {
    if (TALL_R >= 16 && 16 * k <= 24576) return 16;
    if (TALL_R >= 12 && 12 * k <= 24576) return 12;
    if (TALL_R == 8 && 8 * k <= 24576) return 8;
    return TILE_R;
}

/* [d0 x4, d1 x4]: a pair's two float16 scales in its dot product's lanes */
static inline __m256 pair_scales(const uint16_t *d) {
    __m128 two = _mm_cvtph_ps(_mm_cvtsi32_si128(*(const int32_t *)d));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

/* Q4: a unit's weights as unsigned bytes in the dot's order (w[0] the low nibbles, w[1] the
   high ones; an odd block: inputs 0-15 in w[0]'s low half, 16-31 in its high half) */
static inline void q4_unit(const uint8_t *wq, int pair, __m256i w[2]) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i raw;
    if (pair) {
        raw = _mm256_loadu_si256((const __m256i *)wq);
    } else {
        __m128i half = _mm_loadu_si128((const __m128i *)wq);
        raw = _mm256_set_m128i(_mm_srli_epi16(half, 4), half);
    }
    w[0] = _mm256_and_si256(raw, low);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
}

/* Q8_0: a unit's signed weights in the activations' order (a pair: inputs 0-15 of both
   blocks, then 16-31 of both; an odd block: w[0] alone) and their magnitudes */
static inline void q8_unit(const int8_t *wq, int pair, __m256i w[4]) {
    __m256i a = _mm256_loadu_si256((const __m256i *)wq);
    if (pair) {
        __m256i c = _mm256_loadu_si256((const __m256i *)(wq + 32));
        w[0] = _mm256_permute2x128_si256(a, c, 0x20);
        w[1] = _mm256_permute2x128_si256(a, c, 0x31);
    } else {
        w[0] = a;
        w[1] = _mm256_setzero_si256();
    }
    w[2] = _mm256_sign_epi8(w[0], w[0]);
    w[3] = _mm256_sign_epi8(w[1], w[1]);
}

/* The rest's exact int32 block sums with a row's activations y (pair order, a last odd block in
   input order) in a partial group's lanes (BLOCK_LANE: block 2u at lane u, 2u + 1 at 4 + u), the
   other lanes 0. Each unit's dot leaves a pair's first block in lanes 0-3 and its second in 4-7
   (a lone block: its halves added into lanes 0-3); one tree of horizontal adds then sums all the
   units' lanes at once, unit u's into lane u of each half. (A tree per unit and a permute into
   its lanes, before, gave the same integers; the products ran 1.12x as long at k = 896, 4 blocks
   left, 1.17x at 960, 6 left, and the same at 576, 2 left: twenty-first session.) */
static inline __m256i rest_sums(const __m256i w[4][2], int left, const int8_t *y) {
    __m256i p[4];
    for (int u = 0; u < 4; u++) {
        int pair = 2 * u + 1 < left;
        if (2 * u >= left) {
            p[u] = _mm256_setzero_si256();
        } else if (pair) {
            p[u] = pair_dot(w[u][0], w[u][1], y + 64 * u);
        } else {
            __m256i q = dot4(w[u][0], _mm256_loadu_si256((const __m256i *)(y + 64 * u)));
            p[u] = _mm256_zextsi128_si256(_mm_add_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
        }
    }
    /* a partial group of up to 2 units (`left` a constant where inlined): one horizontal add
       less (its other operand's units are zero) */
    __m256i high = left > 4 ? _mm256_hadd_epi32(p[2], p[3]) : _mm256_setzero_si256();
    return _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), high);
}

/* vpmaddubsw wants an unsigned operand: |w| times y with w's sign; two products of up to
   2 * 128 * 127 do not add in 16 bits, so each half is widened alone */
static inline __m256 q8_dot(const __m256i w[4], int pair, const int8_t *y) {
    __m256i p = dot4(w[2], _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)y), w[0]));
    if (pair)
        p = _mm256_add_epi32(p, dot4(w[3], _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(y + 32)), w[1])));
    return _mm256_cvtepi32_ps(p);
}

/* Q4, a whole group's weights (wq: its 128 bytes, block j at 16 j) transposed: load q holds
   blocks 2q (low 128 bits) and 2q + 1 (high), 4 dwords each; two rounds of unpacks (within
   128-bit halves) leave in t[i] dword i of every block, lanes [b0 b2 b4 b6 b1 b3 b5 b7]. Dword
   i's low nibbles are inputs 4i..4i+3, its high ones 16 + 4i.. (group_nibbles). */
static inline void group_raw(const uint8_t *wq, __m256i t[4]) {
    __m256i l[4], a[4];
    for (int q = 0; q < 4; q++) l[q] = _mm256_loadu_si256((const __m256i *)(wq + 32 * q));
    a[0] = _mm256_unpacklo_epi32(l[0], l[1]);   /* b0.0 b2.0 b0.1 b2.1 | b1.0 b3.0 b1.1 b3.1 */
    a[1] = _mm256_unpackhi_epi32(l[0], l[1]);   /* dwords 2, 3 */
    a[2] = _mm256_unpacklo_epi32(l[2], l[3]);   /* blocks 4-7 */
    a[3] = _mm256_unpackhi_epi32(l[2], l[3]);
    t[0] = _mm256_unpacklo_epi64(a[0], a[2]);   /* b0.0 b2.0 b4.0 b6.0 | b1.0 b3.0 b5.0 b7.0 */
    t[1] = _mm256_unpackhi_epi64(a[0], a[2]);
    t[2] = _mm256_unpacklo_epi64(a[1], a[3]);
    t[3] = _mm256_unpackhi_epi64(a[1], a[3]);
}

/* weight vector i (0..7) of a group in lane order, from group_raw's t: lane l holds the unsigned
   values of inputs 4i..4i+3 of block GROUP_LANES[l] */
static inline __m256i group_nibbles(const __m256i t[4], int i) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    return i < 4 ? _mm256_and_si256(t[i], low) : _mm256_and_si256(_mm256_srli_epi16(t[i - 4], 4), low);
}

#ifdef DPBUSD
/* a whole group's 8 weight vectors in lane order (group_dot's w) */
static inline void group_weights(const uint8_t *wq, __m256i w[8]) {
    __m256i t[4];
    group_raw(wq, t);
    for (int i = 0; i < 8; i++) w[i] = group_nibbles(t, i);
}

/* Q4, a whole group of 8 blocks: its weights in lane order (w[i], lane l: the unsigned values
   of inputs 4i..4i+3 of block GROUP_LANES[l]: group_weights) and the group's activations y (lane
   order, the same inputs in the same places). Each of the 8 products adds 4 inputs of every
   block into that block's lane, so the one int32 vector they accumulate into holds the group's
   8 block sums, lanes [b0 b2 b4 b6 b1 b3 b5 b7]: one conversion per group and (row, feature).
   (The AVX2 build computes the same integers in q4_group.) */
static inline __m256 group_dot(const __m256i w[8], const int8_t *y) {
#define Y(i) _mm256_loadu_si256((const __m256i *)(y + 32 * (i)))
    /* two chains of 4 (vpdpbusd's latency), added: integers, exact in any order */
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    for (int i = 0; i < 8; i += 2) {
        a = DPBUSD(a, w[i], Y(i));
        b = DPBUSD(b, w[i + 1], Y(i + 1));
    }
    return _mm256_cvtepi32_ps(_mm256_add_epi32(a, b));
#undef Y
}
#endif

/* 8 per-block values of a whole group (block b at vals[b]) in lane order (group_dot's lanes) */
static inline void group_lanes(const float *vals, float out[8]) {
    for (int l = 0; l < 8; l++) out[l] = vals[GROUP_LANES[l]];
}

/* The activations' scales per row (xv [m, V] floats, V = scales_per_row(nb)): for each group,
   the partial one included, 16 floats in group_dot's lanes, the scales (xd) then their sums'
   (xs, for the offsets' term); a partial group's lanes without a block 0. */
static int64_t scales_per_row(int64_t nb) {
    return (nb + 7) / 8 * 16;
}

static void activation_scales(const float *xd, const float *xs, int64_t m, int64_t nb, float *xv) {
    int64_t V = scales_per_row(nb);
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; 8 * g < nb; g++) {
            float d[8] = {0}, s[8] = {0};
            int64_t count = nb - 8 * g < 8 ? nb - 8 * g : 8;
            memcpy(d, xd + r * nb + 8 * g, sizeof(float) * (size_t)count);
            memcpy(s, xs + r * nb + 8 * g, sizeof(float) * (size_t)count);
            group_lanes(d, xv + r * V + 16 * g);
            group_lanes(s, xv + r * V + 16 * g + 8);
        }
}

/* 8 float16s of a group (block j at j) as floats in group_dot's lanes */
static inline __m256 plane_lanes(__m128i h) {
    return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}

/* a weight plane's 8 float16s of a whole group in group_dot's lanes */
static inline __m256 group_plane(const uint16_t *h) {
    return plane_lanes(_mm_loadu_si128((const __m128i *)h));
}

/* How far ahead of the weights being read a tile asks for them (_mm_prefetch, a hint: an
   address past the end of the weights does not fault). A lone row (decode) is bound by memory,
   and the hardware prefetcher alone streamed its weights at about 24 GB/s on two cores (the
   1B model's layers); reading 1 KB ahead of the stream, 38 GB/s: 1.56x on that row's products,
   1.23x on SmolLM2's, 1.04-1.08x on eight rows, none on 40 (docs/performance.md, eleventh
   session). A Q4 tile reads its F features' rows side by side, so for a row of 1 KB (k =
   2,048) 1 KB ahead was the next feature's row, which the same tile was reading already: Q4
   tiles ask for the same group of the next tile's features instead (F rows ahead), 1.04-1.22x
   on the 1B model's layers alone and 1.1x on its decode step (thirteenth session). A Q8_0
   tile (one feature, the output head) reads 8 KB ahead: 1.1-1.35x on the head against 1 KB. */
#define Q4_AHEAD(F, k) ((F) * ((k) / 2))
#define Q8_AHEAD 8192

/* whole group g (8 blocks): for each of the tile's F features its weights unpacked once, then
   for each of the R rows acc += dot * (dw * dx) and acc += m * s, dot the group's 8 block sums
   (group_dot's lanes) converted once */
static inline __attribute__((always_inline)) void q4_group(
        int R, int F, const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t nb, int64_t g,
        const int8_t *xq, const float *xv, __m256 acc[TALL_R][TILE_F]) {
    int64_t k = nb * 32, V = scales_per_row(nb);
    for (int f = 0; f < F; f++) {
        const uint8_t *at = wq + f * (k / 2) + g * 128;
        _mm_prefetch((const char *)(at + Q4_AHEAD(F, k)), _MM_HINT_T0);
        _mm_prefetch((const char *)(at + Q4_AHEAD(F, k) + 64), _MM_HINT_T0);
        __m256 dw = group_plane(wd + f * nb + 8 * g), dot[TALL_R];
        __m256 mw = wm ? group_plane(wm + f * nb + 8 * g) : _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
#ifdef DPBUSD
        __m256i w[8];
        group_weights(at, w);
        for (int r = 0; r < R; r++) dot[r] = group_dot(w, xq + r * k + g * 256);
#else
        /* The same integers in 16 bits until the last step: a vpmaddubsw lane is 2 products of at
           most 15 * 127, a group's 8 vectors' sum 16 (30,480 < 32,767, in any order); vpmaddwd
           adds a lane's two. A weight vector at a time for all R rows: holding all 8 (group_dot's
           way) left no registers for 8 rows' sums, and at 4 rows gcc kept 2 rows' accumulators
           in memory (this order: 1.0-1.1x there). The empty asm keeps each row's sum one chain in
           a register: without it gcc summed each row's 8 products as a tree, all of them spilled. */
        __m256i t[4], p[TALL_R];
        group_raw(at, t);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            __m256i u = group_nibbles(t, i);
            for (int r = 0; r < R; r++) {
                __m256i q = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(xq + r * k + g * 256 + 32 * i)));
                p[r] = i ? _mm256_add_epi16(p[r], q) : q;
                __asm__("" : "+x"(p[r]));
            }
        }
        for (int r = 0; r < R; r++) dot[r] = _mm256_cvtepi32_ps(_mm256_madd_epi16(p[r], _mm256_set1_epi16(1)));
#endif
        for (int r = 0; r < R; r++) {
            const float *v = xv + r * V + g * 16;
            acc[r][f] = _mm256_fmadd_ps(dot[r], _mm256_mul_ps(dw, _mm256_loadu_ps(v)), acc[r][f]);
            acc[r][f] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(v + 8), acc[r][f]);
        }
    }
}

/* a weight plane's first `left` float16s (a partial group's) in group_dot's lanes, 0 in the
   others */
static inline __m256 rest_plane(const uint16_t *h, int left) {
    /* the dwords holding them (a masked load reads nothing past them), a last odd one's high
       float16 (the next plane's) cleared */
    __m128i v = _mm_maskload_epi32((const int *)h, _mm_cmpgt_epi32(_mm_set1_epi32((left + 1) / 2),
                                                                  _mm_setr_epi32(0, 1, 2, 3)));
    if (left % 2) v = _mm_and_si128(v, _mm_cmpgt_epi16(_mm_set1_epi16((short)left), _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7)));
    return plane_lanes(v);
}

/* the blocks after the whole groups (`left`, 1..7, a constant where inlined), a partial group:
   their block sums in the group's lanes (rest_sums; each feature's units, a pair in pair order
   or a last odd block, unpacked once for the tile's rows), then acc += dot * (dw * dx) and
   acc += m * s as q4_group adds a group */
static inline __attribute__((always_inline)) void q4_rest(
        int R, int F, int left, const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t nb,
        const int8_t *xq, const float *xv, __m256 acc[TALL_R][TILE_F]) {
    int64_t k = nb * 32, V = scales_per_row(nb), first = nb - left;
    for (int f = 0; f < F; f++) {
        __m256i w[4][2];
        for (int u = 0; 2 * u < left; u++)
            q4_unit(wq + f * (k / 2) + (first + 2 * u) * 16, 2 * u + 1 < left, w[u]);
        __m256 dw = rest_plane(wd + f * nb + first, left);
        __m256 mw = wm ? rest_plane(wm + f * nb + first, left) : _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
        for (int r = 0; r < R; r++) {
            const float *v = xv + r * V + V - 16;
            __m256i sums = rest_sums(w, left, xq + r * k + first * 32);
            acc[r][f] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dw, _mm256_loadu_ps(v)), acc[r][f]);
            acc[r][f] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(v + 8), acc[r][f]);
        }
    }
}

/* A tile's pass over a slice of k, whole groups g0..g1 - 1 (q_linear: wide k), and where its
   accumulators wait between passes: row r's of feature f at keep[r * kept + f]. */
struct pass {
    int64_t g0, g1;
    __m256 *keep;
    int64_t kept;
};

/* out[i] = v: a float32, or with `bf16` a bfloat16 rounded as torch rounds (to nearest even,
   a NaN to 0x7fc0) */
static inline void store(void *out, int64_t i, float v, int bf16) {
    if (bf16) {
        uint32_t u;
        memcpy(&u, &v, 4);
        ((uint16_t *)out)[i] = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0
                                                                : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else {
        ((float *)out)[i] = v;
    }
}

/* out[i..i + 8) = v, as store() writes each */
static inline void store8(void *out, int64_t i, __m256 v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)out + i, v);
        return;
    }
    __m256i u = _mm256_castps_si256(v);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    r = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), _mm256_set1_epi32(0x7fc0), nan);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);   /* 8 words, in order */
    _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_castsi256_si128(packed));
}

/* Q4: R rows (xq, xv: their first) x F features (wq, wd, wm: the first) of out [.., n], R and
   F constants where inlined, so the accumulators stay in registers. Per (row, feature), group
   after group: acc = fma(group dot, dw * dx, acc), acc = fma(m, s, acc) (the offsets' term:
   w = d * q + m); then the rest's units and offsets (q4_rest); out = hsum(acc).
   p NULL (a constant where inlined, so its branches fold away: with them every tile's, narrow
   products ran ~3% slower): all of that; else one pass p over a slice of k (q_linear): its
   accumulators start at zero (g0 = 0) or where the previous pass left them, and stay there for
   the next unless p reaches the last group, which adds the rest and writes out. A stored and
   reloaded vector is the same bits: the float operations and their order are the same in one
   pass as in several, so a row's result still does not depend on its tile. hold non-NULL
   (q_linear's whole tiles, F = 1, p NULL): row r's accumulator is left at hold[8 r] instead,
   for q_linear to add 8 features' lanes at once (hsum8: hsum's adds) and store them. */
static inline __attribute__((always_inline)) void q4_tile(
        int R, int F, const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t nb,
        const int8_t *xq, const float *xv, const struct pass *p, void *out, int64_t n, int bf16, __m256 *hold) {
    int64_t g0 = p ? p->g0 : 0, g1 = p ? p->g1 : nb / 8;
    __m256 acc[TALL_R][TILE_F];
    for (int r = 0; r < R; r++)
        for (int f = 0; f < F; f++) acc[r][f] = g0 ? p->keep[r * p->kept + f] : _mm256_setzero_ps();
    for (int64_t g = g0; g < g1; g++) q4_group(R, F, wq, wd, wm, nb, g, xq, xv, acc);
    if (g1 < nb / 8) {
        for (int r = 0; r < R; r++)
            for (int f = 0; f < F; f++) p->keep[r * p->kept + f] = acc[r][f];
        return;
    }
    /* a constant count of the rest's blocks in each call: its branches and copy fold away */
#define REST(left) case left: q4_rest(R, F, left, wq, wd, wm, nb, xq, xv, acc); break;
    switch (nb % 8) { REST(1) REST(2) REST(3) REST(4) REST(5) REST(6) REST(7) }
#undef REST
    if (hold) {
        for (int r = 0; r < R; r++) hold[r * 8] = acc[r][0];
        return;
    }
    for (int r = 0; r < R; r++)
        for (int f = 0; f < F; f++) store(out, r * n + f, hsum(acc[r][f]), bf16);
}

/* Q8_0: R rows x F features, one unit (a pair of blocks, or a last odd block) at a time:
   per (row, feature) acc = fma(unit dot, dw * dx, acc), out = hsum(acc). xv8: the
   activations' scales in the units' lanes ([m, units, 8]). */
static inline __attribute__((always_inline)) void q8_tile(
        int R, int F, const int8_t *wq, const uint16_t *wd, int64_t nb, const int8_t *xq,
        const float *xv8, void *out, int64_t n, int bf16) {
    int64_t k = nb * 32, units = nb / 2 + nb % 2;
    __m256 acc[TILE_R][TILE_F];
    for (int r = 0; r < R; r++)
        for (int f = 0; f < F; f++) acc[r][f] = _mm256_setzero_ps();
    for (int64_t u = 0; u < units; u++) {
        int pair = 2 * u + 1 < nb;
        __m256i w[TILE_F][4];
        __m256 dw[TILE_F];
        for (int f = 0; f < F; f++) {
            _mm_prefetch((const char *)(wq + f * k + u * 64 + Q8_AHEAD), _MM_HINT_T0);
            q8_unit(wq + f * k + u * 64, pair, w[f]);
            dw[f] = pair ? pair_scales(wd + f * nb + 2 * u) : _mm256_set1_ps(_cvtsh_ss(wd[f * nb + 2 * u]));
        }
        for (int r = 0; r < R; r++)
            for (int f = 0; f < F; f++) {
                __m256 scale = _mm256_mul_ps(dw[f], _mm256_loadu_ps(xv8 + (r * units + u) * 8));
                acc[r][f] = _mm256_fmadd_ps(q8_dot(w[f], pair, xq + r * k + u * 64), scale, acc[r][f]);
            }
    }
    for (int r = 0; r < R; r++)
        for (int f = 0; f < F; f++) store(out, r * n + f, hsum(acc[r][f]), bf16);
}

/* per row and unit, the activations' scales in the unit's lanes (Q8_0's xv8 [m, units, 8]) */
static void unit_scales(const float *xd, int64_t m, int64_t nb, float *xv) {
    int64_t units = nb / 2 + nb % 2;
    for (int64_t r = 0; r < m; r++)
        for (int64_t u = 0; u < units; u++)
            for (int j = 0; j < 8; j++)
                xv[(r * units + u) * 8 + j] = xd[r * nb + 2 * u + (2 * u + 1 < nb && j >= 4)];
}

/* Rows per tile, and features per tile for a tile of R rows. Many rows: 4 x 1 with 16 registers
   (Q4: 8 weight vectors in lane order, 4 accumulators and the group's temporaries; 3 x 1 and
   2 x 1 measured slower, 8 x 1 spilled), 6 x 1 with 32 (1.1-1.2x faster than 4 x 1 there;
   8 x 1 about the same as 6), and whole tiles of whole_rows' 12 or 16 where k is narrow. Q4
   with fewer rows (decode, a call's last rows) takes more features, so that enough independent
   accumulators hide the multiply-adds' latency (1 x 1 decoded 2.5x slower at k = 576); Q8_0
   decoded slower at 1 x 2 than 1 x 1 (the head's 28 MB stream from memory either way). */
static int tile_features(int bits, int R) {
    if (bits == 4) return R == 1 ? 4 : R == 2 ? 2 : 1;
    return 1;
}

/* one tile: the constant-size variant for its counts (tile_features' shapes only: each
   variant is compiled code, and the build runs at a process's first int4 load). A pass over a
   slice of k (p, q_linear): Q4's whole tiles (TILE_R x 1) only. */
static void tile_any(int bits, int R, int F, const void *wq, const uint16_t *wd, const uint16_t *wm,
                     int64_t nb, const int8_t *xq, const float *xv, const struct pass *p, void *out,
                     int64_t n, int bf16) {
#define Q4(r, f) case (r) * 8 + (f): \
    q4_tile(r, f, (const uint8_t *)wq, wd, wm, nb, xq, xv, NULL, out, n, bf16, NULL); return;
#define Q8(r) case (r) * 8 + 1: q8_tile(r, 1, (const int8_t *)wq, wd, nb, xq, xv, out, n, bf16); return;
    /* the 6- and 5-row cases only where TILE_R has them (compiled for 4 rows, gcc saw their
       arrays overrun) */
    if (p)
        q4_tile(TILE_R, 1, (const uint8_t *)wq, wd, wm, nb, xq, xv, p, out, n, bf16, NULL);
    else if (bits == 4)
        switch (R * 8 + F) {
#if TILE_R == 6
            Q4(6, 1) Q4(5, 1)
#endif
            Q4(4, 1) Q4(3, 1) Q4(2, 2) Q4(2, 1) Q4(1, 4) Q4(1, 3) Q4(1, 2) Q4(1, 1)
        }
    else
        switch (R * 8 + F) {
#if TILE_R == 6
            Q8(6) Q8(5)
#endif
            Q8(4) Q8(3) Q8(2) Q8(1)
        }
#undef Q4
#undef Q8
}

/* features per chunk: a chunk's weights (64 x k / 2 bytes) stay in L2 while all rows pass
   a tile at a time, each tile's activations (a few rows of k bytes) in L1 */
#ifndef CHUNK
#define CHUNK 64
#endif
_Static_assert(CHUNK % TILE_F == 0, "a chunk has at most CHUNK features: q_linear's keep");

/* The first feature of chunk c of n features in `chunks`: the multiple of TILE_F nearest below
   an even share, so that the threads' shares differ by less than TILE_F features (chunks of one
   size, the last smaller, gave SmolLM2's 576-feature products one thread 300 features and the
   other 276: twenty-sixth session); a chunk has at most CHUNK features where chunks >= n / CHUNK */
static int64_t chunk_start(int64_t c, int64_t n, int64_t chunks) {
    return c * n / chunks / TILE_F * TILE_F;
}

/* How many chunks `count` units (features, packs or pack pairs) go in: about `per` each, as many
   as a multiple of the threads, so that a static split gives each thread as many */
static int64_t thread_chunks(int64_t count, int64_t per, int nt) {
    int64_t chunks = (count + per - 1) / per;
    return (chunks + nt - 1) / nt * nt;
}

/* Q4 groups per pass over k of a whole tile (TILE_R rows), 0: one pass. A tile's activations
   (k bytes a row) are read again for each of the chunk's features. At k = 8,192 (6 rows: 48 KB,
   L1's size) they came from L2 for every feature, and those products gained nothing from the
   tiles; the chunk's features going through the tile a slice of at most SLICE groups at a time
   (4,096 inputs: 24 KB for 6 rows) gained 1.2-1.3x there and at 14,336 (8 groups: less; 24:
   less). Up to k = 4,096 one pass (passes of 8 groups there ran 0.92-0.95x), wider k in passes
   of even size (k = 14,336: 4 of 14 groups), the accumulators kept between them (q4_tile).
   Edge tiles (a call's last rows, decode's lone row) keep one pass: few rows, and a lone row's
   weights stream from memory in long runs. */
#ifndef SLICE
#define SLICE 16
#endif
static int64_t pass_groups(int bits, int64_t k) {
    int64_t groups = bits == 4 ? k / 256 : 0, passes = (groups + SLICE - 1) / SLICE;
    return passes > 1 ? (groups + passes - 1) / passes : 0;
}

/* A chunk's `count` features (wq, wd, wm, out: the first's) through whole Q4 tiles of R rows
   (xq, xv: the first row's), one pass over k. Each tile's results wait in hold until 8 features
   have them, then are added and stored 8 at a time (6% of SmolLM2's products at 512 rows on Zen
   4 against one at a time). The tile is compiled into this loop: through tile_any, a call per
   tile, SmolLM2's products of 40 and 512 rows took 12-15% longer on Zen 4 (nineteenth session).
   A function of its own for each R, a call per chunk and tile row: with a 16-row and a 6-row
   tile both inlined into q_linear's loop the 6-row one ran 0.72-0.94x as fast (twenty-first). */
static inline __attribute__((always_inline)) void whole_tiles(
        int R, const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t nb, const int8_t *xq,
        const float *xv, int64_t count, void *out, int64_t n, int bf16) {
    int64_t k = nb * 32;
    __m256 hold[TALL_R * 8];
    for (int64_t f = 0; f < count; f++) {
        int64_t j = f % 8;
        q4_tile(R, 1, wq + f * (k / 2), wd + f * nb, wm ? wm + f * nb : NULL, nb, xq, xv, NULL, NULL, n, bf16,
                hold + j);
        if (j == 7 || f + 1 == count)   /* 8 features held, or the chunk's last few */
            for (int t = 0; t < R; t++) {
                if (j == 7)
                    store8(out, t * n + f - 7, hsum8(hold + 8 * t), bf16);
                else
                    for (int64_t i = 0; i <= j; i++)
                        store(out, t * n + f - j + i, hsum(hold[8 * t + i]), bf16);
            }
    }
}

/* whole_tiles for each count of rows whole_rows gives, a function of its own */
#define WHOLE(name, rows) \
    static __attribute__((noinline)) void name(const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t nb, \
                                               const int8_t *xq, const float *xv, int64_t count, void *out, \
                                               int64_t n, int bf16) { \
        whole_tiles(rows, wq, wd, wm, nb, xq, xv, count, out, n, bf16); \
    }
WHOLE(whole_tile, TILE_R)
#if TALL_R == 8
WHOLE(whole_8, 8)
#endif
#if TALL_R >= 16
WHOLE(whole_12, 12)
WHOLE(whole_16, 16)
#endif
#undef WHOLE

#if defined(__AVX512BW__) && defined(__AVX512VL__)
/* out[i..i + count) = the first count of v, as store() writes each: float32, or bfloat16
   rounded to nearest even with a NaN as 0x7fc0 */
static inline void store16(void *out, int64_t i, __m512 v, int count, int bf16) {
    __mmask16 keep = (__mmask16)((1u << count) - 1);
    if (!bf16) {
        _mm512_mask_storeu_ps((float *)out + i, keep, v);
        return;
    }
    __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    r = _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), nan, _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16((uint16_t *)out + i, keep, _mm512_cvtepi32_epi16(r));
}
#endif

/* AMX (Sapphire Rapids and later; q4kernel.py compiles this part where the CPU has amx_int8,
   amx_tile and AVX-512 VNNI, BW and VL): a Q4 product of many rows (a prefill) 16 features x 16
   rows at a time. One tdpbusd multiplies a block's unsigned weights of 16 features (16 x 32
   bytes) by its 8-bit activations of 16 rows (q_linear_amx's layout) into 16 x 16 int32 block
   sums, the integers group_dot's and rest_sums' lanes hold, a partial group's blocks as a whole
   group's. Each is converted, scaled and added with the same float operations, in the same
   order, into the same lane of its (row, feature)'s accumulator as q4_tile does, and the lanes
   are added in hsum's order, so a row's result is the same bits as on the other tiles
   (rows_alone). The weights are unpacked once per call and 16 features, and read by all row
   tiles. */
#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <sys/syscall.h>
#include <unistd.h>

/* rows from which a Q4 product runs on the tiles (below about 12, unpacking the weights cost
   more than the tiles saved) */
#define AMX_ROWS 16

static int amx_ready;

/* Linux gives a process the tiles' state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM,
   XFEATURE_XTILEDATA): AMX_ROWS when granted, else 0 */
int q4_amx_enable(void) {
    amx_ready = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return amx_ready ? AMX_ROWS : 0;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* tiles 0, 1: block sums (16 features x 16 rows of int32); 2, 3: weights (16 features x 32
   bytes, one block); 4, 5: activations (8 x 64 bytes: q_linear_amx's). Two blocks at a time. */
static void amx_configure(void) {
    struct tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) {
        c.rows[t] = t >= 4 ? 8 : 16;
        c.colsb[t] = t == 2 || t == 3 ? 32 : 64;
    }
    _tile_loadconfig(&c);
}

/* quantize_block on one block of 16 rows at once, a row per lane (R rows at x, `stride` floats
   or bfloat16s apart; lanes past R 0): each row's steps are quantize_block's, lane by lane (the
   max and the integer sum are exact in any order), so the same 8-bit values and scales, without
   a horizontal step or a scalar division per row (the rows' quantizing took ~15 ms of a 512-row
   prefill's 30 layers of products, row by row). out: the tiles' layout, dword t of row r (its
   inputs 4t .. 4t + 3) at out[16 t + r]; d[r], s[r] the row's scale and scale * sum. */
static inline void quantize_rows16(const void *x, int64_t stride, int bf16, int R, int32_t *out,
                                   float *d, float *s) {
    __m512 v[2][16];   /* inputs 0-15, then 16-31, of each row; transposed: of each input */
    for (int r = 0; r < 16; r++)
        for (int h = 0; h < 2; h++)
            v[h][r] = r >= R ? _mm512_setzero_ps() : load16(x, r * stride + 16 * h, bf16);
    transpose16(v[0]);
    transpose16(v[1]);
    __m512 amax = _mm512_setzero_ps();
    for (int j = 0; j < 16; j++)
        amax = _mm512_max_ps(amax, _mm512_max_ps(_mm512_abs_ps(v[0][j]), _mm512_abs_ps(v[1][j])));
    __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ),
                                     _mm512_set1_ps(127.0f), amax);
    __m512i q[32], sum = _mm512_setzero_si512();
    for (int j = 0; j < 32; j++) {
        q[j] = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v[j / 16][j % 16], inv),
                                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        sum = _mm512_add_epi32(sum, q[j]);
    }
    __m512 dv = _mm512_div_ps(amax, _mm512_set1_ps(127.0f));
    _mm512_storeu_ps(d, dv);
    _mm512_storeu_ps(s, _mm512_mul_ps(dv, _mm512_cvtepi32_ps(sum)));
    const __m512i byte = _mm512_set1_epi32(0xFF);   /* |q| <= 127: a byte, as the saturating packs */
    for (int t = 0; t < 8; t++) {
        __m512i b0 = _mm512_and_si512(q[4 * t], byte), b1 = _mm512_slli_epi32(_mm512_and_si512(q[4 * t + 1], byte), 8);
        __m512i b2 = _mm512_slli_epi32(_mm512_and_si512(q[4 * t + 2], byte), 16), b3 = _mm512_slli_epi32(q[4 * t + 3], 24);
        _mm512_storeu_si512(out + 16 * t, _mm512_or_si512(_mm512_or_si512(b0, b1), _mm512_or_si512(b2, b3)));
    }
}

/* F (<= 16) features' blocks (wq: the first's, rows of k / 2 bytes) unpacked: wb [16][nb][32]
   unsigned, input order (a tile's row of a block: 32 bytes, features nb * 32 bytes apart),
   features past F zero; their d and m (Q4_0: d * -8, as q4_group computes it) as floats,
   fd / fm [16][nb] */
static void amx_weights(const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t nb,
                        int F, uint8_t *wb, float *fd, float *fm) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int f = 0; f < 16; f++) {
        uint8_t *row = wb + f * nb * 32;
        const uint8_t *raw = wq + f * (nb * 16);
        if (f >= F) {
            memset(row, 0, (size_t)(nb * 32));
        } else {
            int64_t b = 0;
            for (; b + 2 <= nb; b += 2) {   /* two blocks: [lo 0, lo 1 | hi 0, hi 1] -> [lo 0, hi 0, lo 1, hi 1] */
                __m256i two = _mm256_loadu_si256((const __m256i *)(raw + b * 16));
                __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(two, low)),
                                                  _mm256_and_si256(_mm256_srli_epi16(two, 4), low), 1);
                _mm512_storeu_si512(row + b * 32, _mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0)));
            }
            if (b < nb) {
                __m128i one = _mm_loadu_si128((const __m128i *)(raw + b * 16));
                _mm_storeu_si128((__m128i *)(row + b * 32), _mm_and_si128(one, _mm256_castsi256_si128(low)));
                _mm_storeu_si128((__m128i *)(row + b * 32 + 16),
                                 _mm_and_si128(_mm_srli_epi16(one, 4), _mm256_castsi256_si128(low)));
            }
        }
        int64_t b = 0;
        for (; f < F && b + 16 <= nb; b += 16) {
            __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wd + f * nb + b)));
            _mm512_storeu_ps(fd + f * nb + b, dv);
            _mm512_storeu_ps(fm + f * nb + b, wm ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wm + f * nb + b)))
                                                 : _mm512_mul_ps(dv, _mm512_set1_ps(-8.0f)));
        }
        for (; b < nb; b++) {
            fd[f * nb + b] = f < F ? _cvtsh_ss(wd[f * nb + b]) : 0.0f;
            fm[f * nb + b] = f < F ? (wm ? _cvtsh_ss(wm[f * nb + b]) : fd[f * nb + b] * -8.0f) : 0.0f;
        }
    }
}

/* group g's block sums (its `count` blocks: 8, or fewer in a partial group) of the 16 features
   of wb and the row tile xt, into out [block][f][r] */
static inline void amx_group_sums(int64_t g, int count, int64_t nb, const uint8_t *wb, const int32_t *xt,
                                  int32_t out[8][16][16]) {
    for (int j = 0; j < count; j += 2) {
        int64_t b = 8 * g + j;
        _tile_loadd(2, wb + b * 32, nb * 32);
        _tile_loadd(4, xt + b * 128, 64);
        _tile_zero(0);
        _tile_dpbusd(0, 2, 4);
        if (j + 1 < count) {
            _tile_loadd(3, wb + b * 32 + 32, nb * 32);
            _tile_loadd(5, xt + b * 128 + 128, 64);
            _tile_zero(1);
            _tile_dpbusd(1, 3, 5);
        }
        _tile_stored(0, out[j], 64);
        if (j + 1 < count) _tile_stored(1, out[j + 1], 64);
    }
}

/* lane of block j of a group (GROUP_LANES inverted) */
static const int BLOCK_LANE[8] = {0, 4, 1, 5, 2, 6, 3, 7};

/* feature f's lanes a[8] (16 rows each) through a group's `count` blocks (sums [block][f][r];
   its d, m: d[j], m[j]; the rows' scales dx[j], sx[j]) as q4_group adds a group: lane
   BLOCK_LANE[j] = fma(dot, d * dx, lane), then fma(m, s, lane). A partial group's lanes
   without a block are left as they are: q4_rest adds 0 * 0 to them, which leaves an
   accumulator as it is (it is never -0: it starts at +0, and a sum that is exactly 0 is +0). */
static inline __attribute__((always_inline)) void amx_scale(int count, __m512 a[8], const int32_t sums[8][16][16],
                                                            int f, const float *d, const float *m,
                                                            const __m512 dx[8], const __m512 sx[8]) {
#pragma GCC unroll 8
    for (int j = 0; j < count; j++) {
        __m512 dot = _mm512_cvtepi32_ps(_mm512_loadu_si512(sums[j][f]));
        a[BLOCK_LANE[j]] = _mm512_fmadd_ps(dot, _mm512_mul_ps(_mm512_set1_ps(d[j]), dx[j]), a[BLOCK_LANE[j]]);
        a[BLOCK_LANE[j]] = _mm512_fmadd_ps(_mm512_set1_ps(m[j]), sx[j], a[BLOCK_LANE[j]]);
    }
}

/* the row tile's (xt: its tiled activations; xd, xs: its scales, [nb][16]) results for the 16
   features of wb, fd, fm: results [f][r]. Per lane from zero group after group (the partial
   one last) as q4_tile adds them; then the lanes added in hsum's order,
   ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). */
static void amx_tile(int64_t nb, const int32_t *xt, const uint8_t *wb, const float *fd,
                     const float *fm, const float *xd, const float *xs, float results[16][16]) {
    int64_t groups = (nb + 7) / 8;
    int32_t sums[2][8][16][16];   /* a group's block sums, [block][feature][row]; two groups */
    float acc[16][8][16];         /* the lanes between groups, [feature][lane][row] */
    /* the tiles compute the next group's sums while the vector units scale this one's */
    amx_group_sums(0, nb < 8 ? (int)nb : 8, nb, wb, xt, sums[0]);
    for (int64_t g = 0; g < groups; g++) {
        int count = nb - 8 * g < 8 ? (int)(nb - 8 * g) : 8, last = g + 1 == groups;
        if (!last) amx_group_sums(g + 1, nb - 8 * g - 8 < 8 ? (int)(nb - 8 * g - 8) : 8, nb, wb, xt, sums[(g + 1) % 2]);
        __m512 dx[8], sx[8];   /* the group's row scales, read by all 16 features (a partial
                                  group's 8: xd and xs are padded) */
        for (int j = 0; j < 8; j++) {
            dx[j] = _mm512_loadu_ps(xd + (8 * g + j) * 16);
            sx[j] = _mm512_loadu_ps(xs + (8 * g + j) * 16);
        }
        for (int f = 0; f < 16; f++) {
            const float *d = fd + f * nb + 8 * g, *m = fm + f * nb + 8 * g;
            __m512 a[8];
            for (int l = 0; l < 8; l++) a[l] = g ? _mm512_loadu_ps(acc[f][l]) : _mm512_setzero_ps();
            if (count == 8) amx_scale(8, a, sums[g % 2], f, d, m, dx, sx);   /* a constant: unrolled */
            else amx_scale(count, a, sums[g % 2], f, d, m, dx, sx);
            if (!last)
                for (int l = 0; l < 8; l++) _mm512_storeu_ps(acc[f][l], a[l]);
            else
                _mm512_storeu_ps(results[f], _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                                                           _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]))));
        }
    }
}

/* Q4 product of m rows on the tiles (q_linear's, where it runs): the rows quantized as
   quantize_block does (the same 8-bit values and scales as the other tiles'), each block's
   dwords written in the tiles' layout (per 16 rows and block, dword t of row r, inputs
   4t..4t+3, at [t][r]: 16 rows' same 4 inputs are one vector) and their scales likewise, by
   both threads; then each thread's features 16 at a time, unpacked once, through every row tile
   (amx_tile). -1 when out of memory. */
static int q_linear_amx(const void *x, int bf16, int64_t m, int64_t k, const uint8_t *qs,
                        const uint16_t *d, const uint16_t *mn, int64_t n, void *out, int nt) {
    int64_t nb = k / 32, tiles = (n + 15) / 16, rowtiles = (m + 15) / 16;
    size_t wsize = (size_t)(nb * 512), ssize = (size_t)(nb * 16);
    int32_t *tiled = malloc((size_t)(rowtiles * 16 * k));   /* every byte written, padding rows 0 */
    uint8_t *wball = malloc(wsize * (size_t)nt);
    float *sall = malloc(sizeof(float) * ssize * 2 * (size_t)nt);
    /* the rows' scales, padded by a group: amx_tile reads a partial group's 8 */
    float *td = calloc((size_t)((rowtiles * nb + 8) * 16), sizeof(float));
    float *ts = calloc((size_t)((rowtiles * nb + 8) * 16), sizeof(float));
    int failed = !tiled || !wball || !sall || !td || !ts;
    if (!failed) {
        #pragma omp parallel num_threads(nt)
        {
            int me = omp_get_thread_num();
            uint8_t *wb = wball + wsize * (size_t)me;
            float *fd = sall + ssize * 2 * (size_t)me, *fm = fd + ssize;
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < rowtiles * nb; i++) {   /* a row tile's block: 16 rows at once */
                int64_t rt = i / nb, b = i % nb;
                quantize_rows16((const char *)x + (rt * 16 * k + b * 32) * (bf16 ? 2 : 4), k, bf16,
                                m - rt * 16 < 16 ? (int)(m - rt * 16) : 16, tiled + i * 128, td + i * 16, ts + i * 16);
            }
            amx_configure();
            #pragma omp for schedule(static)
            for (int64_t tile = 0; tile < tiles; tile++) {
                int64_t f0 = tile * 16;
                int F = n - f0 < 16 ? (int)(n - f0) : 16;
                amx_weights(qs + f0 * (k / 2), d + f0 * nb, mn ? mn + f0 * nb : NULL, nb, F, wb, fd, fm);
                for (int64_t rt = 0; rt < rowtiles; rt++) {
                    int R = m - rt * 16 < 16 ? (int)(m - rt * 16) : 16;
                    float results[16][16];   /* [feature][row]; features past F (zero weights) too */
                    amx_tile(nb, tiled + rt * nb * 128, wb, fd, fm, td + rt * nb * 16, ts + rt * nb * 16, results);
                    const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176,
                                                             192, 208, 224, 240);
                    for (int r = 0; r < R; r++)   /* row r's F results, stored as store() does */
                        store16(out, (rt * 16 + r) * n + f0, _mm512_i32gather_ps(column, &results[0][r], 4), F, bf16);
                }
            }
            _tile_release();
        }
    }
    free(tiled);
    free(wball);
    free(sall);
    free(td);
    free(ts);
    return failed ? -1 : 0;
}

#else
int q4_amx_enable(void) { return 0; }
#endif

/* Feature lanes: a Q4 product on AVX-512 VNNI without AMX (q4kernel.py packs a weight for it
   where q4_lanes() says so). The tiles above give each (row, feature) a vector of 8 block
   lanes, 256-bit wide: 8 integer dot products of 32 inputs and 4 float operations per row and
   8 blocks, and the weights transposed in registers for each tile. Here each lane of a 512-bit
   vector is one of 16 features: the weight is stored packed in 16-feature packs (per pack and
   block of 32 inputs, vector j (64 bytes) holds the 4 bytes j of each feature's 16 bytes of
   nibbles in its lane: its low nibbles inputs 4j..4j+3, its high ones 16 + 4j..; then the
   pack's 16 d and 16 m of the block, each in its plane), and a row's 4 activations that a
   lane's bytes meet are one broadcast 32-bit value. So a block of a row is 8 vpdpbusd for 16
   features (one per weight vector, each the whole block's integer sum in its feature's lane:
   no horizontal step), then acc = fma(sum, d * dx, acc) and acc = fma(m, s, acc): ~1.8x fewer
   instructions per product than the tiles above, the weight vectors unpacked once per block
   for the tile's rows (4 rows x 32 features: 16 weight vectors, 8 accumulators). SmolLM2's 30
   layers of products (random weights of its shapes, two threads, Ice Lake, alternated): 1.87x
   as fast as the tiles above at 512 rows, 1.82x at 128, 1.90x at 40, 1.65x for a lone row;
   its 512-token prefill 2.8-3.6x the issue's code against 2.3-2.7x (twenty-third session,
   docs/performance.md). The weights keep their bytes (the same memory); a decode step streams
   each pack's nibbles, d and m as three runs.
   Every (row, feature) runs the same float operations in the same order, block after block,
   in any tile: a row's result does not depend on what it is batched with. They are not the
   tiles' above (those add 8 block lanes at the end), so a packed weight has other last bits
   than the file's layout on the same CPU. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(__AMX_INT8__)
#define LANES 16

/* the features of a pack: q4kernel.py packs a weight whose features are a multiple of it */
int q4_lanes(void) { return LANES; }

/* rows of a lanes tile (32 features: two packs): 4 rows' 8 accumulators and 16 weight vectors
   fill 24 of the 32 registers (tiles of 16 features x 6, 8 or 12 rows ran 0.85-0.88x,
   0.85-0.93x and 0.73-0.76x as fast on SmolLM2's products: twenty-third session) */
#define LANE_ROWS 4

/* bytes ahead of the block being read that a tile asks for (a lone row streams its weights
   from memory) */
#define LANES_AHEAD 1024

/* a pack's block (at: its 256 bytes) as the 8 vectors of unsigned 4-bit values that vpdpbusd
   meets with a row's activation dwords 0..7 */
static inline void unpack_block(const uint8_t *at, __m512i w[8]) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < 4; j++) {
        __m512i raw = _mm512_loadu_si512(at + 64 * j);
        w[j] = _mm512_and_si512(raw, low);
        w[4 + j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
    }
}

/* a pack's block's d and m (planes' index i) as float32 (wm NULL, Q4_0: m = -8 d, exact) */
static inline void block_scales(const uint16_t *wd, const uint16_t *wm, int64_t i, __m512 *dw, __m512 *mw) {
    *dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wd + i)));
    *mw = wm ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wm + i))) : _mm512_mul_ps(*dw, _mm512_set1_ps(-8.0f));
}

/* a row's block added to its accumulator: the exact integer sum times d * dx, then m times
   dx * sum(q): the operations, in this order, of every (row, feature) on the lanes, whichever
   tile runs it (its bits) */
static inline __m512 add_block(__m512 acc, __m512i sum, __m512 dw, __m512 mw, float dx, float sx) {
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc);
    return _mm512_fmadd_ps(mw, _mm512_set1_ps(sx), acc);
}

/* R rows (xq: the first's 8-bit activations, input order; xd, xs: its blocks' scales and
   scale * sum) x P packs (wq, wd, wm: the first's, the next nb blocks further) into out [.., n];
   R and P constants where inlined */
static inline __attribute__((always_inline)) void lanes_tile(
        int R, int P, const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t nb,
        const int8_t *xq, const float *xd, const float *xs, void *out, int64_t n, int bf16) {
    int64_t k = nb * 32;
    __m512 acc[LANE_ROWS][2];
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i w[2][8];
        __m512 dw[2], mw[2];
        for (int p = 0; p < P; p++) {
            const uint8_t *at = wq + (p * nb + b) * 256;
            for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(at + LANES_AHEAD + 64 * j), _MM_HINT_T0);
            unpack_block(at, w[p]);
            block_scales(wd, wm, (p * nb + b) * 16, &dw[p], &mw[p]);
        }
        for (int r = 0; r < R; r++) {
            const int32_t *y = (const int32_t *)(xq + r * k + b * 32);   /* dword j: inputs 4j..4j+3 */
            __m512i sum[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
            for (int j = 0; j < 8; j++) {
                __m512i yj = _mm512_set1_epi32(y[j]);
                for (int p = 0; p < P; p++) sum[p] = _mm512_dpbusd_epi32(sum[p], w[p][j], yj);
            }
            for (int p = 0; p < P; p++) acc[r][p] = add_block(acc[r][p], sum[p], dw[p], mw[p], xd[r * nb + b], xs[r * nb + b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) store16(out, r * n + 16 * p, acc[r][p], 16, bf16);
}

/* lanes_tile for each shape, a function of its own (a call per tile: nb blocks' work) */
typedef void (*lanes_fn)(const uint8_t *, const uint16_t *, const uint16_t *, int64_t, const int8_t *,
                         const float *, const float *, void *, int64_t, int);
#define LANES_TILE(R, P) \
    static __attribute__((noinline)) void lanes_##R##x##P(const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, \
                                                          int64_t nb, const int8_t *xq, const float *xd, \
                                                          const float *xs, void *out, int64_t n, int bf16) { \
        lanes_tile(R, P, wq, wd, wm, nb, xq, xd, xs, out, n, bf16); \
    }
LANES_TILE(1, 1) LANES_TILE(2, 1) LANES_TILE(3, 1) LANES_TILE(4, 1)
LANES_TILE(1, 2) LANES_TILE(2, 2) LANES_TILE(3, 2) LANES_TILE(4, 2)
#undef LANES_TILE
static const lanes_fn LANES_TILES[2][LANE_ROWS] = {{lanes_1x1, lanes_2x1, lanes_3x1, lanes_4x1},
                                                   {lanes_1x2, lanes_2x2, lanes_3x2, lanes_4x2}};

/* A prompt's rows (WIDE_ROWS or more) go through wide tiles: 4 rows x 3 packs (48 features) on
   the weights unpacked once per call. lanes_tile unpacks a pack's block in registers for each
   tile of rows (12 operations per 32 vpdpbusd) and holds its 16 weight vectors there, which
   leaves room for two packs: per block and 4 x 32 tile 64 vpdpbusd, ~64 other vector operations
   and ~57 loads. Here a thread first unpacks a slice of its packs (unpack_blocks: SLICE_BLOCKS
   blocks, per pack and block the 8 vectors lanes_tile's w[p] holds and its d and m as float32,
   ~35 KB: it stays in L1) and its tiles then read each weight vector as their multiply-adds need
   it (j outer: the packs' vector j, then each row's 4 activations broadcast and its 3
   vpdpbusd), so 12 integer sums and 12 accumulators fit in the registers: per block 96
   vpdpbusd, 48 float operations and 70 loads, all at constant offsets of two pointers (the
   tile's rows' activations side by side: quantize_tiled). A one-thread microbenchmark on the Ice
   Lake Xeon (SmolLM2's k, 480 rows): 0.79-0.82 time-stamp cycles per vpdpbusd against
   lanes_tile's 1.22-1.25 (tiles of 4 x 2 and 3 x 4 packs: 0.92-0.95). Below 16 rows unpacking a
   whole weight gives less than it costs (8 rows: 0.89x; 12: 1.00x; 16: 1.03x; 24: 1.10-1.17x).
   Each (row, feature) runs lanes_tile's operations in lanes_tile's order (its block's integer sum,
   then the same two multiply-adds, block after block; between slices its accumulator waits in
   `keep`, unchanged): a row has the bits it has alone, where lanes_tile runs it (twenty-fifth
   session, docs/performance.md). Where they start to pay depends on the CPU: from 16 rows on the
   Ice Lake Xeon, where lanes_tile ran 0.89x as fast at 8 rows; on a Zen 5 EPYC lanes_tile is
   faster up to ~96 rows (SmolLM2's layers 1.25-1.38x at 16 rows, 1.09x at 48, 1.0 at 96; a 1B
   model's 1.4-1.5x at 16, 1.0 at 128; the wide tiles 1.04-1.07x from 192 on: thirty-third
   session), so q4kernel.py measures it once per process (q4_wide_rows). */
#define WIDE_ROWS 16
#define WIDE_TILE_ROWS 4   /* a wide tile's rows */

/* rows from which q_linear_lanes runs the wide tiles */
static int64_t wide_rows = WIDE_ROWS;

/* that count, set to `rows` first where it is > 0 (0 where the build has no wide tiles) */
int64_t q4_wide_rows(int64_t rows) {
    if (rows > 0)
        wide_rows = rows;
    return wide_rows;
}
#define WIDE_PACKS 3
#define SLICE_BLOCKS 18

/* quantize_block on 16 consecutive blocks (x's from value `first` on; block b's int8s to
   xq + 32 at[b], its scale and scale * sum to xds[2 at[b]] and the next float), the same
   bits: each block's absolute maximum and its integer sum are the same exact values whatever the
   order of their maxima and adds (here 16 blocks' partial ones transposed, a block a lane), the
   scales the same IEEE divisions, then the same products, rounded to nearest even, and the same
   int8s (vpmovsdb: in order, and |q| <= 127 needs no saturation). quantize_block does a block's
   horizontal steps and its two divisions alone (SmolLM2's 512-token prefill: 4% in it; with
   quantize16 2.6%). */
static inline void quantize16(const void *x, int64_t first, int bf16, const int64_t at[16], int8_t *xq, float *xds) {
    __m512 mx[16], q[16][2];
    for (int b = 0; b < 16; b++)
        mx[b] = _mm512_max_ps(_mm512_abs_ps(load16(x, first + 32 * b, bf16)),
                              _mm512_abs_ps(load16(x, first + 32 * b + 16, bf16)));
    transpose16(mx);
    __m512 amax = mx[0];
    for (int i = 1; i < 16; i++) amax = _mm512_max_ps(amax, mx[i]);
    __m512 d = _mm512_div_ps(amax, _mm512_set1_ps(127.0f));
    __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ),
                                     _mm512_set1_ps(127.0f), amax);
    float invs[16];
    _mm512_storeu_ps(invs, inv);
    for (int b = 0; b < 16; b++) {
        __m512 ib = _mm512_set1_ps(invs[b]);
        for (int h = 0; h < 2; h++) {
            __m512i v = _mm512_cvt_roundps_epi32(_mm512_mul_ps(load16(x, first + 32 * b + 16 * h, bf16), ib),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_store_si128((__m128i *)(xq + 32 * at[b] + 16 * h), _mm512_cvtsepi32_epi8(v));
            q[b][h] = _mm512_castsi512_ps(v);
        }
        mx[b] = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(q[b][0]), _mm512_castps_si512(q[b][1])));
    }
    transpose16(mx);
    __m512i sum = _mm512_castps_si512(mx[0]);
    for (int i = 1; i < 16; i++) sum = _mm512_add_epi32(sum, _mm512_castps_si512(mx[i]));
    float ds[2][16];
    _mm512_storeu_ps(ds[0], d);
    _mm512_storeu_ps(ds[1], _mm512_mul_ps(d, _mm512_cvtepi32_ps(sum)));
    for (int b = 0; b < 16; b++) {
        xds[2 * at[b]] = ds[0][b];
        xds[2 * at[b] + 1] = ds[1][b];
    }
}

/* x [m, k] (nb blocks a row) quantized in the wide tiles' order: a tile of T = WIDE_TILE_ROWS
   rows' blocks side by side, block b of row r at index ((r / T) * nb + b) * T + r % T of xq (32
   bytes each) and xds (the scale and scale * sum, 2 floats each). For a few rows (lanes_tile's)
   quantize_block alone took less time: 1.07x a lone row's products (twenty-fifth session) */
static void quantize_tiled(const void *x, int bf16, int64_t m, int64_t nb, int8_t *xq, float *xds, int nt) {
    int64_t total = m * nb;
    #pragma omp parallel for num_threads(nt) schedule(static) if (total >= QUANTIZE_SPLIT_FROM)
    for (int64_t i0 = 0; i0 < total; i0 += 16) {
        int64_t at[16], count = total - i0 < 16 ? total - i0 : 16, r = i0 / nb, c = i0 % nb;
        for (int64_t b = 0; b < count; b++) {   /* block i0 + b: row r's block c */
            at[b] = ((r / WIDE_TILE_ROWS) * nb + c) * WIDE_TILE_ROWS + r % WIDE_TILE_ROWS;
            if (++c == nb) {
                c = 0;
                r++;
            }
        }
        if (count == 16)
            quantize16(x, i0 * 32, bf16, at, xq, xds);
        else
            for (int64_t b = 0; b < count; b++)
                _mm256_store_si256((__m256i *)(xq + 32 * at[b]),
                                   quantize_block(x, i0 + b, bf16, xds + 2 * at[b], xds + 2 * at[b] + 1));
    }
}

/* a slice's block in a thread's scratch, P packs: their 8 weight vectors each (lanes_tile's w[p][j]
   at (8 p + j) * 64), then their d and their m as float32 (Q4_0's m = -8 d), 16 each: a tile's
   loads of a block all at constant offsets of one pointer, and no float16 conversions */
#define SLICE_BLOCK(P) ((P) * 640)

/* P packs' `blocks` blocks (wq, wd, wm: the first pack's first, a pack nb blocks further) into
   wu, SLICE_BLOCK(P) bytes a block */
static void unpack_blocks(int P, const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t blocks,
                          int64_t nb, uint8_t *wu) {
    for (int64_t b = 0; b < blocks; b++) {
        uint8_t *at = wu + b * SLICE_BLOCK(P);
        float *planes = (float *)(at + P * 512);
        for (int p = 0; p < P; p++) {
            __m512i w[8];
            __m512 dw, mw;
            unpack_block(wq + (p * nb + b) * 256, w);
            for (int j = 0; j < 8; j++) _mm512_store_si512(at + p * 512 + 64 * j, w[j]);
            block_scales(wd, wm, (p * nb + b) * 16, &dw, &mw);
            _mm512_store_ps(planes + 16 * p, dw);
            _mm512_store_ps(planes + 16 * (P + p), mw);
        }
    }
}

/* R rows (a tile's: their activations in quantize_tiled's order, xq at the slice's first
   block, 128 bytes a block, xds its scale pairs, 8 floats a block) x P packs over a slice of
   `blocks` blocks (wu: unpack_blocks'); the accumulators start from 0 (`first`) or from keep
   ([R][WIDE_PACKS][16]) and go to out (`last`) or back to keep. R and P constants where inlined */
static inline __attribute__((always_inline)) void wide_tile(
        int R, int P, const uint8_t *wu, int64_t blocks, const int8_t *xq, const float *xds, float *keep,
        int first, int last, void *out, int64_t n, int bf16) {
    __m512 acc[WIDE_TILE_ROWS][WIDE_PACKS];
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++)
            acc[r][p] = first ? _mm512_setzero_ps() : _mm512_load_ps(keep + (r * WIDE_PACKS + p) * 16);
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = wu + b * SLICE_BLOCK(P);
        const float *planes = (const float *)(wb + P * 512), *sc = xds + 2 * WIDE_TILE_ROWS * b;
        const int32_t *y = (const int32_t *)(xq + 32 * WIDE_TILE_ROWS * b);   /* row r's dword j: y[8 r + j] */
        __m512i sum[WIDE_TILE_ROWS][WIDE_PACKS];
        for (int r = 0; r < R; r++)
            for (int p = 0; p < P; p++) sum[r][p] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j++) {
            __m512i w[WIDE_PACKS];
            for (int p = 0; p < P; p++) w[p] = _mm512_load_si512(wb + p * 512 + j * 64);
            for (int r = 0; r < R; r++) {
                __m512i yj = _mm512_set1_epi32(y[8 * r + j]);
                for (int p = 0; p < P; p++) sum[r][p] = _mm512_dpbusd_epi32(sum[r][p], w[p], yj);
            }
        }
        for (int p = 0; p < P; p++) {
            __m512 dw = _mm512_load_ps(planes + 16 * p), mw = _mm512_load_ps(planes + 16 * (P + p));
            for (int r = 0; r < R; r++) acc[r][p] = add_block(acc[r][p], sum[r][p], dw, mw, sc[2 * r], sc[2 * r + 1]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) {
            if (last) store16(out, r * n + 16 * p, acc[r][p], 16, bf16);
            else _mm512_store_ps(keep + (r * WIDE_PACKS + p) * 16, acc[r][p]);
        }
}

/* wide_tile for each shape, a function of its own (a call per tile and slice) */
typedef void (*wide_fn)(const uint8_t *, int64_t, const int8_t *, const float *, float *, int, int, void *,
                        int64_t, int);
#define WIDE_TILE(R, P) \
    static __attribute__((noinline)) void wide_##R##x##P(const uint8_t *wu, int64_t blocks, const int8_t *xq, \
                                                         const float *xds, float *keep, int first, int last, \
                                                         void *out, int64_t n, int bf16) { \
        wide_tile(R, P, wu, blocks, xq, xds, keep, first, last, out, n, bf16); \
    }
WIDE_TILE(1, 1) WIDE_TILE(2, 1) WIDE_TILE(3, 1) WIDE_TILE(4, 1)
WIDE_TILE(1, 2) WIDE_TILE(2, 2) WIDE_TILE(3, 2) WIDE_TILE(4, 2)
WIDE_TILE(1, 3) WIDE_TILE(2, 3) WIDE_TILE(3, 3) WIDE_TILE(4, 3)
#undef WIDE_TILE
static const wide_fn WIDE_TILES[WIDE_PACKS][WIDE_TILE_ROWS] = {{wide_1x1, wide_2x1, wide_3x1, wide_4x1},
                                                  {wide_1x2, wide_2x2, wide_3x2, wide_4x2},
                                                  {wide_1x3, wide_2x3, wide_3x3, wide_4x3}};

/* the wide tiles' product of m rows (xq, xds: quantize_tiled's order, scale pairs) with a
   packed Q4 weight: each thread takes an even share of the packs (within one), WIDE_PACKS at a
   time, and slice by slice unpacks them into its scratch and runs all the rows over them.
   Returns 0, or -1 when the scratch memory could not be allocated. */
static int wide_product(int64_t m, int64_t nb, const uint8_t *qs, const uint16_t *d, const uint16_t *mn,
                        int64_t n, const int8_t *xq, const float *xds, void *out, int bf16, int nt) {
    int64_t packs = n / LANES, slices = (nb + SLICE_BLOCKS - 1) / SLICE_BLOCKS;
    int64_t span = (nb + slices - 1) / slices;   /* blocks per slice: slices of even sizes */
    size_t wsize = (size_t)(span * SLICE_BLOCK(WIDE_PACKS)), ksize = (size_t)(m * WIDE_PACKS * 16);
    uint8_t *scratch = aligned_alloc(64, wsize * (size_t)nt);
    float *keeps = aligned_alloc(64, sizeof(float) * ksize * (size_t)nt);
    if (!scratch || !keeps) {
        free(scratch);
        free(keeps);
        return -1;
    }
    #pragma omp parallel num_threads(nt)
    {
        int me = omp_get_thread_num(), team = omp_get_num_threads();
        uint8_t *wu = scratch + wsize * (size_t)me;
        float *keep = keeps + ksize * (size_t)me;
        int64_t end = (me + 1) * packs / team;
        for (int64_t p0 = me * packs / team; p0 < end; p0 += WIDE_PACKS) {
            int P = end - p0 < WIDE_PACKS ? (int)(end - p0) : WIDE_PACKS;
            for (int64_t b0 = 0; b0 < nb; b0 += span) {
                int64_t blocks = nb - b0 < span ? nb - b0 : span;
                unpack_blocks(P, qs + (p0 * nb + b0) * 256, d + (p0 * nb + b0) * 16, mn ? mn + (p0 * nb + b0) * 16 : NULL,
                              blocks, nb, wu);
                for (int64_t r = 0; r < m; r += WIDE_TILE_ROWS) {
                    int R = m - r < WIDE_TILE_ROWS ? (int)(m - r) : WIDE_TILE_ROWS;
                    int64_t at = (r / WIDE_TILE_ROWS * nb + b0) * WIDE_TILE_ROWS;   /* the tile's first block of the slice */
                    WIDE_TILES[P - 1][R - 1](wu, blocks, xq + 32 * at, xds + 2 * at, keep + r * WIDE_PACKS * 16,
                                             b0 == 0, b0 + blocks == nb, (char *)out + (r * n + p0 * 16) * (bf16 ? 2 : 4),
                                             n, bf16);
                }
            }
        }
    }
    free(scratch);
    free(keeps);
    return 0;
}

/* packs per chunk: a chunk's weights stay in L2 while all its rows pass */
#ifndef LANES_CHUNK
#define LANES_CHUNK 4
#endif

/* q_linear for a packed Q4 weight (bits 4; qs, d, mn: the packs, n a multiple of LANES):
   the rows quantized per block (quantize_block, input order), then the threads split the packs
   in chunks, and a chunk's rows go LANE_ROWS at a time through its packs two at a time, or one
   at a time where all the rows are one tile: a thread's weights are then one stream read in
   order (the next pack's first blocks are what the prefetches ahead of a pack's last fetch).
   Two at a time, SmolLM2's decode step's layers took 1.11-1.17x as long, 1.09-1.14x at 2 rows,
   1.01-1.11x at 4, a 1B model's 1.00-1.08x (8 rows keep two: one at a time ran 0.96-0.98x;
   thirty-first session). Returns 0, or -1 when the scratch memory could not be allocated. */
int q_linear_lanes(int bits, const void *x_in, int bf16, int64_t m, int64_t k, const void *qs,
                   const uint16_t *d, const uint16_t *mn, int64_t n, void *out, int nt) {
    if (bits == 8)
        return q8_lanes_product(x_in, bf16, m, k, (const uint8_t *)qs, d, n, out, nt);
    int64_t nb = k / 32, packs = n / LANES;
    /* the activations' scales: two planes, xd and xs, or (the wide tiles) their pairs side by side in
       quantize_tiled's order, which pads the last tile to WIDE_TILE_ROWS rows */
    int64_t padded = (m + WIDE_TILE_ROWS - 1) / WIDE_TILE_ROWS * WIDE_TILE_ROWS;
    int8_t *xq = aligned_alloc(64, (size_t)((padded * k + 63) / 64 * 64));
    float *xd = malloc(sizeof(float) * (size_t)(2 * padded * nb)), *xs = xd + m * nb;
    int failed = !xq || !xd;
    if (!failed) {
        if (m >= wide_rows) {
            quantize_tiled(x_in, bf16, m, nb, xq, xd, nt);
            failed = wide_product(m, nb, (const uint8_t *)qs, d, mn, n, xq, xd, out, bf16, nt);
        } else {
            quantize_blocks(x_in, bf16, m * nb, xq, xd, xs, nt);
            /* chunks of about LANES_CHUNK packs, as many as a multiple of the threads, each a run of
               pack pairs (the last pack alone where they are odd) and their sizes within a pair of
               each other: with chunks of 4 packs, SmolLM2's 36-pack products gave one thread 20 and
               the other 16 (the threads waited at the barrier: ~8% of a 512-token prefill) */
            int64_t pairs = (packs + 1) / 2, chunks = thread_chunks(pairs, LANES_CHUNK / 2, nt);
            int width = bf16 ? 2 : 4;
            #pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t c = 0; c < chunks; c++) {
                int64_t start = 2 * (c * pairs / chunks), end = 2 * ((c + 1) * pairs / chunks);
                end = end < packs ? end : packs;
                for (int64_t r = 0; r < m; r += LANE_ROWS) {
                    int R = m - r < LANE_ROWS ? (int)(m - r) : LANE_ROWS;
                    for (int64_t p = start, two; p < end; p += 1 + two) {
                        two = m > LANE_ROWS && end - p > 1;
                        LANES_TILES[two][R - 1]((const uint8_t *)qs + p * nb * 256, d + p * nb * 16,
                                                mn ? mn + p * nb * 16 : NULL, nb, xq + r * k, xd + r * nb,
                                                xs + r * nb, (char *)out + (r * n + p * 16) * width, n, bf16);
                    }
                }
            }
        }
    }
    free(xq);
    free(xd);
    return failed ? -1 : 0;
}

/* Q8_0 on the lanes (a tied output head: q4kernel.to_lanes8 packs it, Q8Embedding reads its rows
   from there). A pack's block: 8 vectors of 64 bytes, vector j the 16 features' inputs 4j..4j+3,
   each weight stored plus 128 (unsigned, vpdpbusd's first operand, as Q4's nibbles are), so a
   row's block is 8 vpdpbusd of its signed 8-bit activations (one dword broadcast each) into an
   integer sum started at -128 * the sum of those activations: exactly the block's sum(w * x).
   Then one multiply-add by d * dx. The tiles of q8_tile (a feature at a time, 256-bit, each
   activation vector's sign applied per feature) took a row's sums across lanes at the end and
   gained little from more rows: SmolLM2's head (49,152 x 576) ran 0.43, 0.59, 0.85 and 1.73 ms
   at 1, 2, 4 and 8 rows (thirty-first session). Up to 8 rows a tile (8 weight vectors, 8
   accumulators and 8 sums in the 32 registers), a pack at a time: each thread's packs one stream. */
#define Q8_ROWS 8

static inline __attribute__((always_inline)) void q8_lanes_tile(
        int R, const uint8_t *wq, const uint16_t *wd, int64_t nb, const int8_t *xq, const float *xd,
        const int32_t *xs128, void *out, int64_t n, int bf16) {
    int64_t k = nb * 32;
    __m512 acc[Q8_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *at = wq + b * 512;
        for (int j = 0; j < 8; j++) _mm_prefetch((const char *)(at + 2 * LANES_AHEAD + 64 * j), _MM_HINT_T0);
        __m512i w[8];
        for (int j = 0; j < 8; j++) w[j] = _mm512_loadu_si512(at + 64 * j);
        __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wd + b * 16)));
        for (int r = 0; r < R; r++) {
            const int32_t *y = (const int32_t *)(xq + r * k + b * 32);
            __m512i sum = _mm512_set1_epi32(-xs128[r * nb + b]);
            for (int j = 0; j < 8; j++) sum = _mm512_dpbusd_epi32(sum, w[j], _mm512_set1_epi32(y[j]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) store16(out, r * n, acc[r], 16, bf16);
}

#elif !defined(__AMX_INT8__)
/* Feature lanes on AVX2, without VNNI or with AVX-VNNI (no AVX-512): the packs above at 8
   features (a 256-bit lane each; a pack's block: vector j, 32 bytes, holds the 4 bytes j of each
   feature's nibbles), so a block of a row is the tiles' group turned around: per weight vector
   one vpmaddubsw for 8 features (its unsigned nibbles times the row's 4 activations,
   broadcast), the 8 added in 16 bits (at most 16 products of 15 * 127 a lane, as q4_group's),
   vpmaddwd, then add_block's two multiply-adds; with VNNI one vpdpbusd per weight vector into
   the block's int32 sums instead (the same integers: half the integer operations). Without
   VNNI as many integer operations per product as the tiles, but no horizontal sums (a
   feature's lanes, a partial group's units) and no transposes: SmolLM2's products (k = 576: 2
   groups and 2 blocks) ran 1.2-1.4x as fast as the tiles at 40 to 512 rows (twenty-seventh
   session, docs/performance.md). The same operations in the same order as the AVX-512 lanes
   for every (row, feature), block after block: the same bits on any of these CPUs. */
#define LANES 8

int q4_lanes(void) { return LANES; }

/* a tile: up to 8 rows x one pack (8 integer sums, 4 weight vectors and their temporaries in
   the 16 registers, the accumulators in L1). One pack at a time for any rows: a thread's weights
   are then one stream, read in order (a chunk's packs end to end), and the prefetches ahead of a
   pack's last blocks fetch the next pack's first. With tiles of a lone row x 4 packs and 2 rows
   x 2 packs (4 accumulators in flight, but 4 streams) a decode step's layers took 1.14x as long
   (a 1B model) and 1.14-1.23x (SmolLM2), 1.11-1.16x at 2 rows; with AVX-VNNI 1.14x and 1.22x
   (the 1B model; the same bits; thirty-first session, docs/performance.md) */
#define LANE_ROWS 8
#define LANES_AHEAD 1024

/* a row's block added to its accumulator (the AVX-512 lanes' add_block at 8 lanes) */
static inline __m256 add_block(__m256 acc, __m256i sum, __m256 dw, __m256 mw, float dx, float sx) {
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc);
    return _mm256_fmadd_ps(mw, _mm256_set1_ps(sx), acc);
}

/* a row's sums of a block so far plus one weight vector's products with the row's 4 activations
   x (i: the vector, 0 starts the block): 16-bit sums (the empty asm: q4_group's, one chain in a
   register), or with VNNI the block's int32 ones */
static inline __m256i lane_step(__m256i sum, __m256i u, __m256i x, int i) {
#ifdef DPBUSD
    return DPBUSD(i ? sum : _mm256_setzero_si256(), u, x);
#else
    __m256i q = _mm256_maddubs_epi16(u, x);
    sum = i ? _mm256_add_epi16(sum, q) : q;
    __asm__("" : "+x"(sum));
    return sum;
#endif
}

/* a block's int32 sums from lane_step's */
static inline __m256i lane_sums(__m256i sum) {
#ifdef DPBUSD
    return sum;
#else
    return _mm256_madd_epi16(sum, _mm256_set1_epi16(1));
#endif
}

/* R rows (xq: the first's activations, input order; xd, xs: its blocks' scales and scale *
   sum) x a pack (wq, wd, wm) into out [.., n]; R constant where inlined. A pack's block is read
   a weight vector at a time for all R rows (q4_group's order, and its empty asm: one chain of
   16-bit sums per row in a register). */
static inline __attribute__((always_inline)) void lanes_tile(
        int R, const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t nb,
        const int8_t *xq, const float *xd, const float *xs, void *out, int64_t n, int bf16) {
    int64_t k = nb * 32;
    /* a cache line each (acc[r][0]): two to a line took 1.03x as long at 40 rows */
    __m256 acc[LANE_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *at = wq + b * 128;
        _mm_prefetch((const char *)(at + LANES_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(at + LANES_AHEAD + 64), _MM_HINT_T0);
        __m256i raw[4], sum[LANE_ROWS] = {0};   /* (lane_step's i = 0 reads none of them) */
        for (int j = 0; j < 4; j++) raw[j] = _mm256_loadu_si256((const __m256i *)(at + 32 * j));
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b * 8)));
        __m256 mw = wm ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + b * 8)))
                       : _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            __m256i u = group_nibbles(raw, i);
            for (int r = 0; r < R; r++)
                sum[r] = lane_step(sum[r], u, _mm256_set1_epi32(*(const int32_t *)(xq + r * k + b * 32 + 4 * i)), i);
        }
        for (int r = 0; r < R; r++)
            acc[r][0] = add_block(acc[r][0], lane_sums(sum[r]), dw, mw, xd[r * nb + b], xs[r * nb + b]);
    }
    for (int r = 0; r < R; r++) store8(out, r * n, acc[r][0], bf16);
}

/* lanes_tile for each row count, a function of its own */
#define LANES_TILE(R) \
    static __attribute__((noinline)) void lanes_##R(const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, \
                                                    int64_t nb, const int8_t *xq, const float *xd, \
                                                    const float *xs, void *out, int64_t n, int bf16) { \
        lanes_tile(R, wq, wd, wm, nb, xq, xd, xs, out, n, bf16); \
    }
LANES_TILE(8) LANES_TILE(4) LANES_TILE(2) LANES_TILE(1)
#undef LANES_TILE

/* a chunk's packs (start..end) for all m rows: 8, 4, 2 or 1 at a time, a pack at a time */
static void lanes_chunk(int64_t start, int64_t end, int64_t m, int64_t nb, const uint8_t *qs, const uint16_t *d,
                        const uint16_t *mn, const int8_t *xq, const float *xd, const float *xs, void *out,
                        int64_t n, int bf16) {
    int64_t k = nb * 32;
    int width = bf16 ? 2 : 4;
    for (int64_t r = 0, R; r < m; r += R) {
        R = m - r >= 8 ? 8 : m - r >= 4 ? 4 : m - r >= 2 ? 2 : 1;
        for (int64_t p = start; p < end; p++) {
            const uint8_t *wq = qs + p * nb * 128;
            const uint16_t *wd = d + p * nb * 8, *wm = mn ? mn + p * nb * 8 : NULL;
            void *at = (char *)out + (r * n + p * LANES) * width;
            const int8_t *x = xq + r * k;
            const float *dx = xd + r * nb, *sx = xs + r * nb;
            (R == 8 ? lanes_8 : R == 4 ? lanes_4 : R == 2 ? lanes_2 : lanes_1)(wq, wd, wm, nb, x, dx, sx, at, n, bf16);
        }
    }
}

#ifdef DPBUSD
/* Q8_0 on the 8-feature lanes with AVX-VNNI: the AVX-512 lanes' Q8_0 (to_lanes8's packs at 8
   features: a pack's block 8 vectors of 32 bytes), a weight vector at a time for all the tile's
   rows (their integer sums in registers, the accumulators in L1, a cache line each); the same
   integers and the same multiply-add per (row, feature, block): the same bits. (Without VNNI,
   none: bytes plus 128 would saturate vpmaddubsw's 16-bit pairs.) */
#define Q8_ROWS 8

static inline __attribute__((always_inline)) void q8_lanes_tile(
        int R, const uint8_t *wq, const uint16_t *wd, int64_t nb, const int8_t *xq, const float *xd,
        const int32_t *xs128, void *out, int64_t n, int bf16) {
    int64_t k = nb * 32;
    __m256 acc[Q8_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *at = wq + b * 256;
        for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(at + 2 * LANES_AHEAD + 64 * j), _MM_HINT_T0);
        __m256i sum[Q8_ROWS];
        for (int r = 0; r < R; r++) sum[r] = _mm256_set1_epi32(-xs128[r * nb + b]);
        for (int j = 0; j < 8; j++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(at + 32 * j));
            for (int r = 0; r < R; r++)
                sum[r] = DPBUSD(sum[r], w, _mm256_set1_epi32(*(const int32_t *)(xq + r * k + b * 32 + 4 * j)));
        }
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b * 8)));
        for (int r = 0; r < R; r++)
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_mul_ps(dw, _mm256_set1_ps(xd[r * nb + b])),
                                        acc[r][0]);
    }
    for (int r = 0; r < R; r++) store8(out, r * n, acc[r][0], bf16);
}
#endif

/* rows from which a product's chunks go to whichever thread is free (4 packs a chunk), not in
   even shares of about CHUNK features: on this project's noisy 2-core VM a thread often ran
   its share slower than the other, which then waited (OpenMP's waits were 14% of a 40-token
   prefill). SmolLM2's products, medians of alternated rounds (twenty-seventh session): in a
   noisy hour 1.34x at 40 rows, 1.11-1.19x at 128, 1.03-1.06x at 512; in a quiet one 0.98-1.01x
   at 40, 0.97x at 32 (the best rounds alike either way); 0.80x for a lone row (its weights
   stream from memory), 0.89x at 2 rows, 0.94x at 4, 0.97-1.01x at 8 and 16: below 32 rows
   the even shares stay. */
#define LANES_DYNAMIC_ROWS 32
#define DYNAMIC_PACKS 4   /* packs a chunk taken by whichever thread is free */

/* q_linear for a packed Q4 weight (n a multiple of LANES): the rows quantized per block (input
   order), then the threads take the packs in chunks (lanes_chunk). Returns 0, or -1 when the
   scratch memory could not be allocated. */
int q_linear_lanes(int bits, const void *x_in, int bf16, int64_t m, int64_t k, const void *qs,
                   const uint16_t *d, const uint16_t *mn, int64_t n, void *out, int nt) {
#ifdef Q8_ROWS
    if (bits == 8)
        return q8_lanes_product(x_in, bf16, m, k, (const uint8_t *)qs, d, n, out, nt);
#endif
    (void)bits;
    int64_t nb = k / 32, packs = n / LANES;
    int8_t *xq = aligned_alloc(64, (size_t)((m * k + 63) / 64 * 64));
    float *xd = malloc(sizeof(float) * (size_t)(2 * m * nb)), *xs = xd + m * nb;
    int failed = !xq || !xd;
    if (!failed) {
        quantize_blocks(x_in, bf16, m * nb, xq, xd, xs, nt);
        if (m >= LANES_DYNAMIC_ROWS) {
            #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
            for (int64_t p = 0; p < packs; p += DYNAMIC_PACKS)
                lanes_chunk(p, p + DYNAMIC_PACKS < packs ? p + DYNAMIC_PACKS : packs, m, nb, qs, d, mn, xq, xd, xs,
                            out, n, bf16);
        } else {
            /* chunks of about CHUNK features, as many as a multiple of the threads, even shares */
            int64_t chunks = thread_chunks(packs, CHUNK / LANES, nt);
            #pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t c = 0; c < chunks; c++)
                lanes_chunk(c * packs / chunks, (c + 1) * packs / chunks, m, nb, qs, d, mn, xq, xd, xs, out, n,
                            bf16);
        }
    }
    free(xq);
    free(xd);
    return failed ? -1 : 0;
}
#else
int q4_lanes(void) { return 0; }
#endif
#ifndef WIDE_ROWS
int64_t q4_wide_rows(int64_t rows) {   /* no wide tiles in this build */
    (void)rows;
    return 0;
}
#endif

/* features per pack of the Q8_0 lanes (q4kernel.to_lanes8), 0 in the builds without them */
#ifdef Q8_ROWS
int q8_lanes(void) { return LANES; }
#else
int q8_lanes(void) { return 0; }
#endif

#ifdef Q8_ROWS
typedef void (*q8_lanes_fn)(const uint8_t *, const uint16_t *, int64_t, const int8_t *, const float *,
                            const int32_t *, void *, int64_t, int);
#define Q8_LANES_TILE(R) \
    static __attribute__((noinline)) void q8_lanes_##R(const uint8_t *wq, const uint16_t *wd, int64_t nb, \
                                                       const int8_t *xq, const float *xd, const int32_t *xs128, \
                                                       void *out, int64_t n, int bf16) { \
        q8_lanes_tile(R, wq, wd, nb, xq, xd, xs128, out, n, bf16); \
    }
Q8_LANES_TILE(1) Q8_LANES_TILE(2) Q8_LANES_TILE(3) Q8_LANES_TILE(4)
Q8_LANES_TILE(5) Q8_LANES_TILE(6) Q8_LANES_TILE(7) Q8_LANES_TILE(8)
#undef Q8_LANES_TILE
static const q8_lanes_fn Q8_LANES_TILES[Q8_ROWS] = {q8_lanes_1, q8_lanes_2, q8_lanes_3, q8_lanes_4,
                                                    q8_lanes_5, q8_lanes_6, q8_lanes_7, q8_lanes_8};

/* q_linear_lanes for a packed Q8_0 weight (qs: to_lanes8's bytes, d: its scales, n a multiple of
   LANES), in the builds with Q8_0 lanes (AVX-512 VNNI, AVX-VNNI): the rows quantized per block
   as for Q4, each block's 128 * sum of its 8-bit values (xs128), then the threads take even
   runs of packs, Q8_ROWS rows at a time through each. */
int q8_lanes_product(const void *x_in, int bf16, int64_t m, int64_t k, const uint8_t *qs,
                     const uint16_t *d, int64_t n, void *out, int nt) {
    int64_t nb = k / 32, packs = n / LANES;
    int8_t *xq = aligned_alloc(64, (size_t)((m * k + 63) / 64 * 64));
    float *xd = malloc(sizeof(float) * (size_t)(2 * m * nb)), *xs = xd + m * nb;
    int32_t *xs128 = malloc(sizeof(int32_t) * (size_t)(m * nb));
    int failed = !xq || !xd || !xs128;
    if (!failed) {
        quantize_blocks(x_in, bf16, m * nb, xq, xd, xs, nt);
        for (int64_t i = 0; i < m * nb; i++) {
            int32_t sum = 0;
            for (int j = 0; j < 32; j++) sum += xq[i * 32 + j];
            xs128[i] = 128 * sum;
        }
        int64_t chunks = thread_chunks(packs, 4, nt);   /* about 4 packs a chunk, even runs a thread */
        int width = bf16 ? 2 : 4;
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t c = 0; c < chunks; c++)
            for (int64_t r = 0; r < m; r += Q8_ROWS) {
                int R = m - r < Q8_ROWS ? (int)(m - r) : Q8_ROWS;
                for (int64_t p = c * packs / chunks; p < (c + 1) * packs / chunks; p++)
                    Q8_LANES_TILES[R - 1](qs + p * nb * 32 * LANES, d + p * nb * LANES, nb, xq + r * k, xd + r * nb,
                                          xs128 + r * nb, (char *)out + (r * n + p * LANES) * width, n, bf16);
            }
    }
    free(xq);
    free(xd);
    free(xs128);
    return failed ? -1 : 0;
}
#endif

/* rows ids[0..count) of a to_lanes8 weight [n, k] in packs of `pack` features (nb = k / 32
   blocks; a pack's block: 8 vectors of 4 * pack bytes, vector j the features' inputs 4j..4j+3)
   dequantized into out [count, k] float32: q * d, exact (Q8Embedding's lookups). Returns 0, or
   -1 (nothing written) where an id is outside 0..n - 1. */
int q8_lanes_rows(const uint8_t *qs, const uint16_t *d, int64_t n, const int64_t *ids, int64_t count,
                  int64_t k, int64_t pack, float *out) {
    int64_t nb = k / 32;
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= n)
            return -1;
    for (int64_t i = 0; i < count; i++) {
        int64_t p = ids[i] / pack, lane = ids[i] % pack;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *at = qs + ((p * nb + b) * 8 * pack + lane) * 4;
            float scale = _cvtsh_ss(d[(p * nb + b) * pack + lane]);
            for (int j = 0; j < 8; j++)
                for (int c = 0; c < 4; c++)
                    out[i * k + b * 32 + 4 * j + c] = (float)(int8_t)(at[4 * pack * j + c] ^ 0x80) * scale;
        }
    }
    return 0;
}

/* out [m, n] = x [m, k] (quantized here) times w^T, w [n, k]: a Q4 weight (bits 4: qs uint8
   [n, k / 2], d and mn float16 [n, k / 32]; mn NULL for Q4_0, m = -8 d) or a Q8_0 one (bits 8:
   qs int8 [n, k], d; mn unused). x and out float32, or both bfloat16 with `bf16` (each output
   the float32 result rounded as torch rounds it: a bfloat16 model's layers skip two conversions
   a call). Threads
   split the features in chunks; a chunk's rows and features go a tile at a time, a whole
   tile's in passes over slices of k where k is wide (pass_groups). Returns 0, or -1 when the
   scratch memory could not be allocated. */
int q_linear(int bits, const void *x_in, int bf16, int64_t m, int64_t k, const void *qs,
             const uint16_t *d, const uint16_t *mn, int64_t n, void *out, int nt) {
    int64_t nb = k / 32, wrow = bits == 4 ? k / 2 : k, groups = bits == 4 ? nb / 8 : 0;
    int64_t span = pass_groups(bits, k);
    /* scales per row: Q4 a vector per group of 8 blocks, Q8_0 a vector per unit */
    int64_t vectors = bits == 4 ? scales_per_row(nb) / 8 : nb / 2 + nb % 2;
#ifdef AMX_ROWS
    if (bits == 4 && amx_ready && m >= AMX_ROWS)
        return q_linear_amx(x_in, bf16, m, k, qs, d, mn, n, out, nt);
#endif
    /* the tiles' operands on cache lines (64 bytes): unaligned, every other 32-byte load of the
       activations straddled two lines, and SmolLM2's products at 512 rows took 1.1-1.2x as long
       on an Intel Xeon (Ice Lake; twentieth session) */
    int8_t *xq = aligned_alloc(64, (size_t)((m * k + 63) / 64 * 64));
    float *xd = malloc(sizeof(float) * (size_t)(m * nb)), *xs = malloc(sizeof(float) * (size_t)(m * nb));
    float *xv = aligned_alloc(64, sizeof(float) * (size_t)((m * vectors * 8 + 15) / 16 * 16));
    int failed = 0;
    if (!xq || !xd || !xs || !xv) {
        failed = -1;
        goto done;
    }
    quantize_rows(x_in, bf16, m, k, bits == 4, xq, xd, xs, nt);
    if (bits == 4) activation_scales(xd, xs, m, nb, xv);
    else unit_scales(xd, m, nb, xv);
    /* chunks of at most CHUNK features, as many as a multiple of the threads (chunk_start) */
    int64_t chunks = thread_chunks(n, CHUNK, nt);
    int whole = whole_rows(k);   /* rows of a whole Q4 tile */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        __m256 keep[span ? TILE_R * CHUNK : 1];   /* passes' accumulators: [tile row][chunk feature] */
        int64_t start = chunk_start(c, n, chunks), end = c + 1 == chunks ? n : chunk_start(c + 1, n, chunks);
        for (int64_t r = 0, step; r < m; r += step) {
            int R = bits == 4 && m - r >= whole ? whole : m - r < TILE_R ? (int)(m - r) : TILE_R;
            int TF = tile_features(bits, R), sliced = span && R == TILE_R;
            step = R;
            if (bits == 4 && !sliced && (R == TILE_R || R == whole)) {   /* whole tiles */
#if TALL_R >= 16
                (R == 16 ? whole_16 : R == 12 ? whole_12 : whole_tile)(
#elif TALL_R == 8
                (R == 8 ? whole_8 : whole_tile)(
#else
                whole_tile(
#endif
                    (const uint8_t *)qs + start * wrow, d + start * nb, mn ? mn + start * nb : NULL, nb,
                    xq + r * k, xv + r * vectors * 8, end - start, (char *)out + (r * n + start) * (bf16 ? 2 : 4),
                    n, bf16);
                continue;
            }
            struct pass p = {.g0 = 0, .g1 = groups, .kept = CHUNK};
            do {   /* one pass over all of k, or one per slice of span groups */
                if (sliced) p.g1 = p.g0 + span < groups ? p.g0 + span : groups;
                for (int64_t f = start; f < end; f += TF) {
                    const uint8_t *wf = (const uint8_t *)qs + f * wrow;
                    const uint16_t *mf = mn ? mn + f * nb : NULL;
                    void *at = (char *)out + (r * n + f) * (bf16 ? 2 : 4);
                    p.keep = keep + (f - start);
                    tile_any(bits, R, end - f < TF ? (int)(end - f) : TF, wf, d + f * nb, mf, nb,
                             xq + r * k, xv + r * vectors * 8, sliced ? &p : NULL, at, n, bf16);
                }
                p.g0 = p.g1;
            } while (p.g0 < groups);
        }
    }
done:
    free(xq);
    free(xd);
    free(xs);
    free(xv);
    return failed;
}

/* w [n, k] float32: a Q4 weight's values, d * q + m (mn NULL: Q4_0, m = -8 d), for a
   prefill's dense matmul */
void q4_dequantize(const uint8_t *qs, const uint16_t *d, const uint16_t *mn, int64_t n, int64_t k,
                   float *w, int nt) {
    int64_t blocks = n * (k / 32);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < blocks; i++) {
        const __m256 db = _mm256_set1_ps(_cvtsh_ss(d[i]));
        const __m256 mb = mn ? _mm256_set1_ps(_cvtsh_ss(mn[i])) : _mm256_mul_ps(db, _mm256_set1_ps(-8.0f));
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
