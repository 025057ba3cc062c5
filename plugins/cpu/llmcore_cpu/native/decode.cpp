// llmcore native CPU decode step: every layer of a Llama-family model for a batch of
// single-token rows, in one call, with the weights read in place from the torch model.
//
// Why: a decode step on a CPU streams every weight once. torch's bf16 and int8 matmuls
// reach 9-14 GB/s on matrix-vector shapes on this project's machine (27 GB/s is what a
// plain read gets), and the step pays ~20 dispatches per layer on top. Here each
// projection is a register-tiled loop (rows x batch rows) over the weight as stored, the
// norms, RoPE, KV-cache write, paged attention (online softmax over the block table),
// SiLU and residual adds run between them inside one OpenMP region, and the step is one
// foreign call.
//
// Built at first use by llmcore_cpu/native/__init__.py (g++ -O3 -march=native -fopenmp),
// loaded with ctypes; the structs below mirror the ctypes Structures there field for field.
// Kernels: AVX-512 (BF16 dot products where the CPU has them), AVX2 + FMA on CPUs without
// AVX-512, and a portable scalar path.

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <string>
#include <vector>
// Software prefetch distance, bytes ahead in each weight row being read: the tiles read R
// rows at once, which the hardware prefetchers follow poorly (measured on the 2-core EPYC:
// int8 rows 1.4x faster at 2 KB ahead, bf16 rows 1.1x at 4 KB)
#define PF_BF16 4096
#define PF_I8 2048
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define HAVE_AVX2_ONLY 1  // AVX2 + FMA kernels for CPUs without AVX-512 (most desktop and many server x86)
#endif

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_I8 = 2, KIND_Q4 = 3 };

struct Linear {
    const void* w;       // [n, k] row-major: float32, bfloat16 or int8; 4-bit: [n/4, k/32, 4, 16] bytes ("4-bit groups")
    const float* scale;  // [n] per-row scale (int8 only) or null
    const float* bias;   // [n] or null
    const int32_t* rowsum;  // [n] sum of each int8 row (int8 only) or null
    int64_t n, k;
    int32_t kind;
    int32_t packed;  // 1: w is in 16-row panels (see "packed weights" below), else row-major
    const void* groups;   // 4-bit only: [n/4, k / group, 2, 4] (scales, zeros) per group of a tile of
                          //   four rows, float32 or bfloat16 (group_kind): W = (q - 8) * scale + zero,
                          //   torch's int4pack form ("4-bit groups")
    int32_t group;        // 4-bit only: k elements per group (a multiple of 32)
    int32_t group_kind;   // KIND_F32 or KIND_BF16
    const int32_t* bsum;  // packed int8 with k % 64 == 0 (AVX-512 VNNI builds): [n/16][k/64][16], 128 x
                          //   the sum of each 64-element block of a row (ptile_i8q's correction), else null
};

struct Layer {
    Linear qkv, o, gate_up, down;
    const float* in_norm;   // [hidden]
    const float* post_norm; // [hidden]
    const float* q_norm;    // [head_dim] or null (Qwen3)
    const float* k_norm;    // [head_dim] or null
    void* k_cache;          // [blocks, block_size, kv_heads, head_dim] (cache_kind)
    void* v_cache;
};

struct Model {
    int64_t hidden, n_heads, n_kv_heads, head_dim, inter, vocab, n_layers, block_size, max_pos;
    float eps, attn_scale;
    int32_t cache_kind;    // KIND_F32 or KIND_BF16
    int32_t round_bf16;    // round activations to bf16 where a bf16 model would (HF numerics)
    const void* embed;     // [vocab, hidden]
    const float* embed_scale;  // int8 table: per-row scale
    int32_t embed_kind;
    int32_t embed_packed;  // the table is the output projection's, in 16-row panels
    const float* final_norm;
    Linear lm_head;
    const float* rope_cos;  // [max_pos, head_dim]
    const float* rope_sin;
    const Layer* layers;
};

// ------------------------------------------------------------------ scalar helpers

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// ------------------------------------------------------------------ matrix products
//
// y[b, r] (+)= sum_k x[b, k] * W[r, k] for rows r in [r0, r1) and every batch row b.
// Register tiles of R weight rows x BT batch rows: each weight vector loaded feeds BT
// products, each activation vector R products; single-stream decode is the R x 1 case.

#if defined(__AVX512F__)

static inline __m512 load_bf16_as_f32(const uint16_t* p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}


// Four horizontal sums at once (lane i of the result = sum of the i-th vector): ~13 shuffles
// and adds instead of ~32 for four separate reductions, which at k = 576 cost half as much as
// the dot products themselves.
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
    __m256 v = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
    return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

static inline __m128i hsum4_epi32(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    __m256i v = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

// out[i * BT + j] = sum(acc[i][j]), four at a time
template <int R, int BT>
static inline void store_sums(__m512 (&acc)[R][BT], float* out) {
    constexpr int N = R * BT;
    __m512* a = &acc[0][0];
    int n = 0;
    for (; n + 4 <= N; n += 4) _mm_storeu_ps(out + n, hsum4(a[n], a[n + 1], a[n + 2], a[n + 3]));
    for (; n < N; n++) out[n] = _mm512_reduce_add_ps(a[n]);
}

#if defined(__AVX512BF16__)
// bf16 x bf16 -> f32 dot products, 32 elements per instruction, into acc (zeroed here)
template <int R, int BT>
static inline void dot_bf16(const uint16_t* w, int64_t k, const uint16_t* x, int64_t xs, __m512 (&acc)[R][BT]) {
    for (int i = 0; i < R; i++)
        for (int j = 0; j < BT; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t kk = 0;
    for (; kk + 32 <= k; kk += 32) {
        __m512i xv[BT];
        for (int j = 0; j < BT; j++) xv[j] = _mm512_loadu_si512(x + j * xs + kk);
        for (int i = 0; i < R; i++) {
            _mm_prefetch((const char*)(w + i * k + kk) + PF_BF16, _MM_HINT_T0);
            __m512i wv = _mm512_loadu_si512(w + i * k + kk);
            for (int j = 0; j < BT; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv, (__m512bh)xv[j]);
        }
    }
    if (kk < k) {
        __mmask32 m = (__mmask32)((1ull << (k - kk)) - 1);
        __m512i xv[BT];
        for (int j = 0; j < BT; j++) xv[j] = _mm512_maskz_loadu_epi16(m, x + j * xs + kk);
        for (int i = 0; i < R; i++) {
            __m512i wv = _mm512_maskz_loadu_epi16(m, w + i * k + kk);
            for (int j = 0; j < BT; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv, (__m512bh)xv[j]);
        }
    }
}
template <int R, int BT>
static inline void tile_bf16(const uint16_t* w, int64_t k, const uint16_t* x, int64_t xs, float* out) {
    __m512 acc[R][BT];
    dot_bf16<R, BT>(w, k, x, xs, acc);
    store_sums<R, BT>(acc, out);
}
#endif

// Sixteen weights (or activations) as float32, masked: the loaders of the float32-FMA tile below
static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(const uint16_t* p, __mmask16 m) { return load_bf16_as_f32(p, m); }
static inline __m512 load16(const int8_t* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// The float32-FMA tile, for float32 weights, bf16 without AVX512-BF16, and int8 without VNNI:
// R weight rows x BT activation rows, sixteen products per instruction, into acc (zeroed here)
template <int R, int BT, typename WT, typename XT>
static inline void dot_fma(const WT* w, int64_t k, const XT* x, int64_t xs, __m512 (&acc)[R][BT]) {
    for (int i = 0; i < R; i++)
        for (int j = 0; j < BT; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k; kk += 16) {
        __mmask16 m = k - kk >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - kk)) - 1);
        __m512 xv[BT];
        for (int j = 0; j < BT; j++) xv[j] = load16(x + j * xs + kk, m);
        for (int i = 0; i < R; i++) {
            __m512 wv = load16(w + i * k + kk, m);
            for (int j = 0; j < BT; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
}
template <int R, int BT, typename WT, typename XT>
static inline void tile_fma(const WT* w, int64_t k, const XT* x, int64_t xs, float* out) {
    __m512 acc[R][BT];
    dot_fma<R, BT>(w, k, x, xs, acc);
    store_sums<R, BT>(acc, out);
}

#if !defined(__AVX512BF16__)
template <int R, int BT>
static inline void tile_bf16(const uint16_t* w, int64_t k, const uint16_t* x, int64_t xs, float* out) {
    tile_fma<R, BT>(w, k, x, xs, out);
}
#endif
template <int R, int BT>
static inline void tile_f32(const float* w, int64_t k, const float* x, int64_t xs, float* out) {
    tile_fma<R, BT>(w, k, x, xs, out);
}
template <int R, int BT>
static inline void tile_i8(const int8_t* w, int64_t k, const float* x, int64_t xs, float* out) {
    tile_fma<R, BT>(w, k, x, xs, out);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_I16_DOT 1
// int8 weights x int16 activations, exactly, without widening the weights: each activation
// q = 256 * hi + lo is two byte planes, lo (0..255) and hi + 128 (0..255), and vpdpbusd
// multiplies unsigned bytes by the signed weight bytes, 64 products per instruction:
//   sum w q = 256 * (sum w (hi + 128) - 128 * sum w) + sum w lo
// (sum w per row precomputed). Half the instructions of widening to int16 and no overflow
// risk in the int32 lanes (|sum| <= k * 255 * 128), so q uses the full int16 range.
template <int R, int BT>
static inline void tile_i8b_(const int8_t* w, int64_t k, const uint8_t* xlo, const uint8_t* xhi, int64_t xs,
                             const int32_t* rowsum, const float* xsc, float* out, int ostride) {
    __m512i alo[R][BT], ahi[R][BT];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < BT; j++) alo[i][j] = ahi[i][j] = _mm512_setzero_si512();
    for (int64_t kk = 0; kk < k; kk += 64) {
        __mmask64 m = k - kk >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - kk)) - 1);
        __m512i lo[BT], hi[BT];
        for (int j = 0; j < BT; j++) {
            lo[j] = _mm512_maskz_loadu_epi8(m, xlo + j * xs + kk);
            hi[j] = _mm512_maskz_loadu_epi8(m, xhi + j * xs + kk);
        }
        for (int i = 0; i < R; i++) {
            _mm_prefetch((const char*)(w + i * k + kk) + PF_I8, _MM_HINT_T0);
            __m512i wv = _mm512_maskz_loadu_epi8(m, w + i * k + kk);
            for (int j = 0; j < BT; j++) {
                alo[i][j] = _mm512_dpbusd_epi32(alo[i][j], lo[j], wv);
                ahi[i][j] = _mm512_dpbusd_epi32(ahi[i][j], hi[j], wv);
            }
        }
    }
    constexpr int N = R * BT;
    int32_t hs[N], ls[N];
    __m512i* ah = &ahi[0][0];
    __m512i* al = &alo[0][0];
    int n = 0;
    for (; n + 4 <= N; n += 4) {
        _mm_storeu_si128((__m128i*)(hs + n), hsum4_epi32(ah[n], ah[n + 1], ah[n + 2], ah[n + 3]));
        _mm_storeu_si128((__m128i*)(ls + n), hsum4_epi32(al[n], al[n + 1], al[n + 2], al[n + 3]));
    }
    for (; n < N; n++) {
        hs[n] = _mm512_reduce_add_epi32(ah[n]);
        ls[n] = _mm512_reduce_add_epi32(al[n]);
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < BT; j++) {
            const int32_t h = hs[i * BT + j] - 128 * rowsum[i];
            out[i * ostride + j] = ((float)h * 256.f + (float)ls[i * BT + j]) * xsc[j];
        }
}

// at most 2 x R x 2 accumulators live: wider batch tiles go two rows at a time
template <int R, int BT>
static inline void tile_i8b(const int8_t* w, int64_t k, const uint8_t* xlo, const uint8_t* xhi, int64_t xs,
                            const int32_t* rowsum, const float* xsc, float* out) {
    if constexpr (BT <= 2) {
        tile_i8b_<R, BT>(w, k, xlo, xhi, xs, rowsum, xsc, out, BT);
    } else {
        for (int j = 0; j + 2 <= BT; j += 2)
            tile_i8b_<R, 2>(w, k, xlo + j * xs, xhi + j * xs, xs, rowsum, xsc + j, out + j, BT);
        if constexpr (BT % 2)
            tile_i8b_<R, 1>(w, k, xlo + (BT - 1) * xs, xhi + (BT - 1) * xs, xs, rowsum, xsc + BT - 1,
                            out + BT - 1, BT);
    }
}
#endif

#elif defined(HAVE_AVX2_ONLY)
// AVX2 + FMA: the same register tiles, 8 lanes wide. 16 vector registers hold at most 8
// accumulators beside the loads, so a 4 x 4 tile runs as two 4 x 2 tiles (the second reads
// the four weight rows again, from L1). Weights and activations are widened to float32 in
// registers (bf16: a 16-bit shift; int8: sign extension), products accumulate in float32.

static inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 ld8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline __m256 ld8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline float as_f32(float v) { return v; }
static inline float as_f32(uint16_t v) { return bf16_to_f32(v); }
static inline float as_f32(int8_t v) { return (float)v; }

static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// A tile too wide for the registers runs as two of half the batch rows: their R x H and
// R x (BT - H) results joined into the R x BT tile
template <int R, int H, int BT>
static inline void join_halves(const float* lo, const float* hi, float* out) {
    for (int i = 0; i < R; i++)
        for (int j = 0; j < BT; j++) out[i * BT + j] = j < H ? lo[i * H + j] : hi[i * (BT - H) + j - H];
}

template <int R, int BT, typename WT, typename XT>
static inline void tile_avx2(const WT* w, int64_t k, const XT* x, int64_t xs, float* out) {
    if constexpr (R * BT > 8) {
        constexpr int H = BT / 2;
        float lo[R * H], hi[R * (BT - H)];
        tile_avx2<R, H>(w, k, x, xs, lo);
        tile_avx2<R, BT - H>(w, k, x + H * xs, xs, hi);
        return join_halves<R, H, BT>(lo, hi, out);
    } else {
        __m256 acc[R][BT];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < BT; j++) acc[i][j] = _mm256_setzero_ps();
        int64_t kk = 0;
        for (; kk + 8 <= k; kk += 8) {
            __m256 xv[BT];
            for (int j = 0; j < BT; j++) xv[j] = ld8(x + j * xs + kk);
            for (int i = 0; i < R; i++) {
                // int8 rows: the next tile's row, one line ahead per 64 weights (the single-stream
                // products waited on memory without it: the 4-bit tiles ran 1.2-1.4x faster with it)
                if constexpr (sizeof(WT) == 1)
                    if ((kk & 63) == 0) _mm_prefetch((const char*)(w + (i + R) * k + kk), _MM_HINT_T0);
                const __m256 wv = ld8(w + i * k + kk);
                for (int j = 0; j < BT; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
            }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < BT; j++) {
                float s = hsum8(acc[i][j]);
                for (int64_t t = kk; t < k; t++) s += as_f32(w[i * k + t]) * as_f32(x[j * xs + t]);
                out[i * BT + j] = s;
            }
    }
}
// bf16 x bf16, 16 at a time: interleaving zeros below each 16-bit value makes it a float32 (no
// shift), and since weights and activations are interleaved alike the lane order does not matter
template <int R, int BT>
static inline void tile_bf16(const uint16_t* w, int64_t k, const uint16_t* x, int64_t xs, float* out) {
    if constexpr (R * BT > 8) {
        constexpr int H = BT / 2;
        float lo[R * H], hi[R * (BT - H)];
        tile_bf16<R, H>(w, k, x, xs, lo);
        tile_bf16<R, BT - H>(w, k, x + H * xs, xs, hi);
        return join_halves<R, H, BT>(lo, hi, out);
    } else {
        const __m256i z = _mm256_setzero_si256();
        // one batch row: two accumulators per weight row (two chains of FMAs, not one twice as long);
        // more: one each, the registers go to the wider tile
        constexpr int A = BT == 1 ? 2 : 1;
        __m256 acc[R][BT][A];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < BT; j++)
                for (int a = 0; a < A; a++) acc[i][j][a] = _mm256_setzero_ps();
        int64_t kk = 0;
        for (; kk + 16 <= k; kk += 16) {
            __m256 xl[BT], xh[BT];
            for (int j = 0; j < BT; j++) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(x + j * xs + kk));
                xl[j] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
                xh[j] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
            }
            for (int i = 0; i < R; i++) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(w + i * k + kk));
                const __m256 wl = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
                const __m256 wh = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
                for (int j = 0; j < BT; j++) {
                    acc[i][j][0] = _mm256_fmadd_ps(wl, xl[j], acc[i][j][0]);
                    acc[i][j][A - 1] = _mm256_fmadd_ps(wh, xh[j], acc[i][j][A - 1]);
                }
            }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < BT; j++) {
                float s = hsum8(A == 2 ? _mm256_add_ps(acc[i][j][0], acc[i][j][A - 1]) : acc[i][j][0]);
                for (int64_t t = kk; t < k; t++) s += bf16_to_f32(w[i * k + t]) * bf16_to_f32(x[j * xs + t]);
                out[i * BT + j] = s;
            }
    }
}
template <int R, int BT>
static inline void tile_f32(const float* w, int64_t k, const float* x, int64_t xs, float* out) {
    tile_avx2<R, BT>(w, k, x, xs, out);
}
template <int R, int BT>
static inline void tile_i8(const int8_t* w, int64_t k, const float* x, int64_t xs, float* out) {
    tile_avx2<R, BT>(w, k, x, xs, out);
}

#else  // portable: the compiler vectorises what it can

template <int R, int BT>
static inline void tile_bf16(const uint16_t* w, int64_t k, const uint16_t* x, int64_t xs, float* out) {
    for (int i = 0; i < R; i++)
        for (int j = 0; j < BT; j++) {
            float s = 0.f;
            for (int64_t kk = 0; kk < k; kk++) s += bf16_to_f32(w[i * k + kk]) * bf16_to_f32(x[j * xs + kk]);
            out[i * BT + j] = s;
        }
}
template <int R, int BT>
static inline void tile_f32(const float* w, int64_t k, const float* x, int64_t xs, float* out) {
    for (int i = 0; i < R; i++)
        for (int j = 0; j < BT; j++) {
            float s = 0.f;
            for (int64_t kk = 0; kk < k; kk++) s += w[i * k + kk] * x[j * xs + kk];
            out[i * BT + j] = s;
        }
}
template <int R, int BT>
static inline void tile_i8(const int8_t* w, int64_t k, const float* x, int64_t xs, float* out) {
    for (int i = 0; i < R; i++)
        for (int j = 0; j < BT; j++) {
            float s = 0.f;
            for (int64_t kk = 0; kk < k; kk++) s += (float)w[i * k + kk] * x[j * xs + kk];
            out[i * BT + j] = s;
        }
}
#endif

// ------------------------------------------------------------------ 4-bit groups (KIND_Q4)
// Weights W[r, t] = q * scale + offset, q in 0..15, one (scale, offset) per group of `group`
// elements of a row (int4 and awq: llama.cpp's Q4_1 block at group 32), kept as torch's int4pack
// keeps them: (scale, zero = offset + 8 * scale) in the model's dtype. Rows go in tiles of four,
// each tile one sequential stream per tensor (a product reads a tile's four rows together):
//   nibbles [n/4][k/32][4][16] bytes: per block of 32 elements, row i's 16 bytes, byte j holding
//     element j (low nibble) and element 16 + j (high), so one 16-byte load gives two runs of 16;
//   groups  [n/4][k/group][2][4]: per group, the four rows' scales, then their zeros.
// Tile p starts at byte p * 2k of the nibbles and element p * 8 * (k / group) of the groups, i.e.
// where row 4p would start in row-major [n, k/2] and [n, k/group, 2]. One or two batch rows:
// integer products on int8 activations (tile_q4q8_4x1); more: rows_q4 dequantizes the rows to
// float32 (q4_dequant_row) for the float32 tiles, which read them for every batch row.

// row r's nibble byte holding element t (t % 32 < 16: low nibble, else high)
static inline const uint8_t* q4_byte(const Linear& L, int64_t r, int64_t t) {
    return (const uint8_t*)L.w + (r >> 2) * 2 * L.k + (t / 32) * 64 + (r & 3) * 16 + t % 16;
}

// row r's group g: scale s and offset o = zero - 8 * scale (exact in float32 for bfloat16 pairs)
static inline void q4_group(const Linear& L, int64_t r, int64_t g, float& s, float& o) {
    const int64_t i = ((r >> 2) * (L.k / L.group) + g) * 8 + (r & 3);
    float z;
    if (L.group_kind == KIND_BF16) {
        s = bf16_to_f32(((const uint16_t*)L.groups)[i]);
        z = bf16_to_f32(((const uint16_t*)L.groups)[i + 4]);
    } else {
        s = ((const float*)L.groups)[i];
        z = ((const float*)L.groups)[i + 4];
    }
    o = fmaf(-8.f, s, z);
}

// row r's dequantized elements [0, k) into out
static void q4_dequant_row(const Linear& L, int64_t r, float* out) {
    const int64_t k = L.k;
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m128i m = _mm_set1_epi8(15);
    for (; t + 32 <= k; t += 32) {
        float s, o;
        q4_group(L, r, t / L.group, s, o);
        const __m256 sc = _mm256_set1_ps(s), of = _mm256_set1_ps(o);
        const __m128i v = _mm_loadu_si128((const __m128i*)q4_byte(L, r, t));
        const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        _mm256_storeu_ps(out + t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), sc, of));
        _mm256_storeu_ps(out + t + 8,
                         _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), sc, of));
        _mm256_storeu_ps(out + t + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), sc, of));
        _mm256_storeu_ps(out + t + 24,
                         _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), sc, of));
    }
#endif
    for (; t < k; t++) {
        float s, o;
        q4_group(L, r, t / L.group, s, o);
        const uint8_t v = *q4_byte(L, r, t);
        out[t] = fmaf((float)(t % 32 < 16 ? (v & 15) : (v >> 4)), s, o);
    }
}

#if defined(__AVX2__) && defined(__FMA__)
// The single-stream product on integers (llama.cpp's Q4_1 x Q8 scheme): activations quantized
// per block of 32 to int8 (q8, scale dx per block), the 32 nibbles of a row multiplied by them
// with vpmaddubsw (unsigned 4-bit x signed 8-bit, pairs summed to int16, at most 2 x 15 x 127)
// and vpmaddwd, then one FMA by scale x dx per 32 weights. A tile's four rows sit in one 64-byte
// line per block and their group parameters in one 16- or 32-byte load per group, so the loop
// reads two sequential streams (a row-major layout read eight, and the loop waited on them). The
// AVX-512 build runs this too. The offsets multiply the exact float sum of each block (xsum),
// four rows in one FMA, so the only rounding added is the activations' (half a step of amax/127
// per element).
// how far ahead the nibbles (blocks of 64 bytes) and the group parameters are prefetched: 4 KB of
// nibbles. On the AVX-512 EPYC (Zen 5) the loop waited on the nibble loads at 8 blocks (perf: half
// its samples); int4 single stream, median of 5 x 256 tokens: 8 blocks 163-175 tok/s, 32 188-206,
// 64 224-230, 128 220-225 (the AVX2 build: 159-173 -> 184-210 at 64). 8 and 16 measured alike on
// the Zen 3 VM with the slower 256-bit kernel.
constexpr int64_t Q4_PF_BLOCKS = 64, Q4_PF_GROUPS = 64;
template <int GK>
static inline void q4_group4(const void* gp, int64_t g, __m128& s, __m128& o) {
    if constexpr (GK == KIND_BF16) {
        const uint16_t* p = (const uint16_t*)gp + 8 * g;
        const __m128i v = _mm_loadu_si128((const __m128i*)p);  // 4 scales, 4 zeros
        s = _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), v));
        const __m128 z = _mm_castsi128_ps(_mm_unpackhi_epi16(_mm_setzero_si128(), v));
        o = _mm_fnmadd_ps(_mm_set1_ps(8.f), s, z);
    } else {
        const float* p = (const float*)gp + 8 * g;
        s = _mm_loadu_ps(p);
        o = _mm_fnmadd_ps(_mm_set1_ps(8.f), s, _mm_loadu_ps(p + 4));
    }
}

// Two rows per 32-byte load: rows i and i + 1 of a block are adjacent, so one load gives both
// rows' 16 bytes; their low nibbles (elements 0-15 of each row) multiply [x0..x15 | x0..x15] and
// their high ones [x16..x31 | x16..x31], the two int16 products are added (at most 4 x 15 x 127)
// and widened by pairs: lanes 0-3 sum row i, lanes 4-7 row i + 1. ~11 instructions per two rows
// where a row at a time took ~9 per row.
#define Q4Q8_PAIR(i, acc, sdp)                                                                       \
    {                                                                                                \
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wb + 32 * i));                         \
        const __m256i lo = _mm256_and_si256(v, m), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m); \
        const __m256i p = _mm256_madd_epi16(                                                         \
            _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)), ones);   \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sdp, acc);                                      \
    }
template <int GK>
static inline void tile_q4q8_4x1(const uint8_t* w, const void* gp, int64_t k, int64_t group, const int8_t* xq,
                                 const float* xscale, const float* xsum, float* out) {
    const __m256i m = _mm256_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i lo_idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), hi_idx = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    __m256 a01 = _mm256_setzero_ps(), a23 = a01;
    __m128 ov = _mm_setzero_ps();
    const int64_t bpg = group / 32;  // blocks per group
    for (int64_t g = 0, t = 0; t < k; g++) {
        __m128 s4, o4;
        q4_group4<GK>(gp, g, s4, o4);
        _mm_prefetch((const char*)gp + (g + Q4_PF_GROUPS) * (GK == KIND_BF16 ? 16 : 32), _MM_HINT_T0);
        const __m256 s8 = _mm256_set_m128(s4, s4);
        for (int64_t j = 0; j < bpg; j++, t += 32) {
            const uint8_t* wb = w + 2 * t;  // this block's 64 bytes
            _mm_prefetch((const char*)(wb + 64 * Q4_PF_BLOCKS), _MM_HINT_T0);
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + t));
            const __m256i xlo = _mm256_permute2x128_si256(xv, xv, 0x00), xhi = _mm256_permute2x128_si256(xv, xv, 0x11);
            const __m256 sd = _mm256_mul_ps(s8, _mm256_set1_ps(xscale[t / 32]));
            ov = _mm_fmadd_ps(o4, _mm_set1_ps(xsum[t / 32]), ov);
            Q4Q8_PAIR(0, a01, _mm256_permutevar8x32_ps(sd, lo_idx))
            Q4Q8_PAIR(1, a23, _mm256_permutevar8x32_ps(sd, hi_idx))
        }
    }
    // a01: row 0 in lanes 0-3, row 1 in 4-7; a23 likewise
    const __m256 h = _mm256_hadd_ps(a01, a23);  // r0 r0 r2 r2 | r1 r1 r3 r3 (partial sums)
    const __m256 h2 = _mm256_hadd_ps(h, h);     // r0 r2 r0 r2 | r1 r3 r1 r3
    const __m128 r = _mm_unpacklo_ps(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1));
    _mm_storeu_ps(out, _mm_add_ps(r, ov));
}
#undef Q4Q8_PAIR
#define HAVE_Q4Q8 1

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The 4-bit product with AVX-512 VNNI for one batch row: tile_q4q8_4xn_512 below.
template <int GK, int NB>
static inline void tile_q4q8_4xn_512(const uint8_t* w, const void* gp, int64_t k, int64_t group,
                                     const int8_t* xq, const float* xscale, const float* xsum, float* out);
template <int GK>
static inline void tile_q4q8_4x1_512(const uint8_t* w, const void* gp, int64_t k, int64_t group,
                                     const int8_t* xq, const float* xscale, const float* xsum, float* out) {
    tile_q4q8_4xn_512<GK, 1>(w, gp, k, group, xq, xscale, xsum, out);
}

// The 4-bit product with AVX-512 VNNI, for NB batch rows at once (one: single-stream decode; four:
// prompts and batched decode up to Q4_INT_ROWS rows). A block's 64-byte line (four rows' 16 bytes)
// is one vector, its low and high nibbles multiply the block's activations 0-15 and 16-31
// broadcast to each row's 128-bit lane, and vpdpbusd sums four unsigned 4-bit x signed 8-bit
// products per int32 lane (lanes 4i..4i+3 are row i): a block of four rows is two vpdpbusd and
// one FMA by the rows' scales x dx per batch row, where the 256-bit tile took ~22 instructions.
// The line, its nibble masks and the group's scales are shared by the NB rows. Same integer sums
// as the 256-bit tile; the float sums group eight products per lane where it grouped four.
// out[n * 4 + i]: batch row n, weight row i.
template <int GK, int NB>
static inline void tile_q4q8_4xn_512(const uint8_t* w, const void* gp, int64_t k, int64_t group,
                                     const int8_t* xq, const float* xscale, const float* xsum, float* out) {
    const __m512i m = _mm512_set1_epi8(15);
    const __m512i rowlane = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const int64_t ks = k / 32;  // a batch row's stride in xscale and xsum
    __m512 acc[NB];
    __m128 ov[NB];
#pragma GCC unroll 4
    for (int n = 0; n < NB; n++) {
        acc[n] = _mm512_setzero_ps();
        ov[n] = _mm_setzero_ps();
    }
    const int64_t bpg = group / 32;
    for (int64_t g = 0, t = 0; t < k; g++) {
        __m128 s4, o4;
        q4_group4<GK>(gp, g, s4, o4);
        _mm_prefetch((const char*)gp + (g + Q4_PF_GROUPS) * (GK == KIND_BF16 ? 16 : 32), _MM_HINT_T0);
        const __m512 s16 = _mm512_permutexvar_ps(rowlane, _mm512_castps128_ps512(s4));
        for (int64_t j = 0; j < bpg; j++, t += 32) {
            _mm_prefetch((const char*)(w + 2 * t + 64 * Q4_PF_BLOCKS), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(w + 2 * t);
            const __m512i lo = _mm512_and_si512(v, m), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
#pragma GCC unroll 4
            for (int n = 0; n < NB; n++) {
                const int8_t* xr = xq + n * k + t;
                const __m512i xlo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)xr));
                const __m512i xhi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(xr + 16)));
                const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo), hi, xhi);
                acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(s16, _mm512_set1_ps(xscale[n * ks + t / 32])),
                                         acc[n]);
                ov[n] = _mm_fmadd_ps(o4, _mm_set1_ps(xsum[n * ks + t / 32]), ov[n]);
            }
        }
    }
#pragma GCC unroll 4
    for (int n = 0; n < NB; n++) {
        const __m256 h = _mm256_hadd_ps(_mm512_castps512_ps256(acc[n]), _mm512_extractf32x8_ps(acc[n], 1));
        const __m256 h2 = _mm256_hadd_ps(h, h);
        const __m128 r = _mm_unpacklo_ps(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1));
        _mm_storeu_ps(out + 4 * n, _mm_add_ps(r, ov[n]));
    }
}
#define HAVE_Q4Q8_512 1
#endif
#endif

// Batch rows up to which 4-bit products run the integer tiles once per batch row (the tile's lines
// stay in L1 across the rows), above which rows_q4 dequantizes to float32 once for all of them.
// With VNNI the integer tile is cheap enough to repeat: a 40-token int4 prompt took ~145 ms
// dequantized (the row-major float32 tiles), where eetq's took ~37.
#if defined(HAVE_Q4Q8_512)
constexpr int64_t Q4_INT_ROWS = 64;
#else
constexpr int64_t Q4_INT_ROWS = 2;
#endif

// Any other case, and builds without AVX2 + FMA: scalar loops on float32 activations (with AVX2
// every 4-bit product of one or two rows has its int8 activations, so this is never hot there)
template <int R, int BT>
static inline void tile_q4(const Linear& L, int64_t r, const float* x, int64_t xs, float* out) {
    for (int i = 0; i < R; i++)
        for (int j = 0; j < BT; j++) {
            float s = 0.f;
            for (int64_t t = 0; t < L.k; t++) {
                float sc, of;
                q4_group(L, r + i, t / L.group, sc, of);
                const uint8_t v = *q4_byte(L, r + i, t);
                s += fmaf((float)(t % 32 < 16 ? (v & 15) : (v >> 4)), sc, of) * x[j * xs + t];
            }
            out[i * BT + j] = s;
        }
}

// Activations for one product: float32 rows, plus their bf16 copy for bf16 weights.
struct Act {
    const float* f;
    const uint16_t* h;
    int64_t stride;  // elements between batch rows
    const uint8_t* qlo = nullptr;  // int16 copy for int8 weights as two byte planes (quant_rows),
    const uint8_t* qhi = nullptr;  //   stride k
    const float* qscale = nullptr;  // per batch row
    const int8_t* q8 = nullptr;     // 4-bit weights, one or two batch rows: int8 per block of 32 (stride k),
    const float* q8scale = nullptr;  //   its scale and the block's exact float sum (stride k / 32)
    const float* q8sum = nullptr;
    const int16_t* q16 = nullptr;   // int8 panels on AVX2: rows as int16 (quant_rows16), stride k
    const uint8_t* qb = nullptr;    // int8 panels, more than two batch rows (AVX-512 VNNI): int8 per block
    const float* qbscale = nullptr;  //   of 64, stored + 128 (stride k), and each block's scale (stride k / 64)
};

#ifdef HAVE_Q4Q8
// Rows of x as int8 per block of 32 (scale amax / 127, round to nearest even) and each block's sum
static void quant_q8_blocks(const Act& x, int64_t B, int64_t k, int8_t* q, float* scale, float* sum) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < k; t += 32) {
            const float* r = x.f + b * x.stride + t;
            float amax = 0.f, s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
            const __m256 sign = _mm256_set1_ps(-0.f);
            __m256 v[4], am = _mm256_setzero_ps(), sm = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(r + 8 * i);
                am = _mm256_max_ps(am, _mm256_andnot_ps(sign, v[i]));
                sm = _mm256_add_ps(sm, v[i]);
            }
            __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
            a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
            amax = _mm_cvtss_f32(_mm_max_ss(a4, _mm_movehdup_ps(a4)));
            __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sm), _mm256_extractf128_ps(sm, 1));
            s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            s = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            // round to nearest even (the default mode), then int32 -> int8 in element order
            const __m256 iv = _mm256_set1_ps(inv);
            const __m256i q01 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[0], iv)),
                                                   _mm256_cvtps_epi32(_mm256_mul_ps(v[1], iv)));
            const __m256i q23 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[2], iv)),
                                                   _mm256_cvtps_epi32(_mm256_mul_ps(v[3], iv)));
            const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q01, q23),
                                                            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i*)(q + b * k + t), q8);
#else
            for (int i = 0; i < 32; i++) {
                amax = fmaxf(amax, fabsf(r[i]));
                s += r[i];
            }
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            for (int i = 0; i < 32; i++) q[b * k + t + i] = (int8_t)lrintf(r[i] * inv);
#endif
            scale[(b * k + t) / 32] = amax / 127.f;
            sum[(b * k + t) / 32] = s;
        }
}
#endif

// Rows of x as int16 (full range, one scale per row: finer than bf16's 8-bit mantissa for every
// element within 1/128 of the row's largest), stored as the byte planes tile_i8b reads.
static void quant_rows(const Act& x, int64_t B, int64_t k, uint8_t* lo, uint8_t* hi, float* qscale) {
    const float qmax = 32767.f;
    for (int64_t b = 0; b < B; b++) {
        const float* r = x.f + b * x.stride;
        float amax = 0.f;
        int64_t i = 0;
#if defined(__AVX512F__)
        __m512 am = _mm512_setzero_ps();
        for (; i + 16 <= k; i += 16) am = _mm512_max_ps(am, _mm512_abs_ps(_mm512_loadu_ps(r + i)));
        amax = _mm512_reduce_max_ps(am);
#endif
        for (; i < k; i++) amax = fmaxf(amax, fabsf(r[i]));
        const float sc = amax > 0.f ? amax / qmax : 0.f, inv = amax > 0.f ? qmax / amax : 0.f;
        i = 0;
#if defined(__AVX512F__)
        // round to nearest even (lrintf's default mode), 16 at a time
        const __m512 iv = _mm512_set1_ps(inv);
        for (; i + 16 <= k; i += 16) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r + i), iv));
            _mm_storeu_si128((__m128i*)(lo + b * k + i), _mm512_cvtepi32_epi8(q));
            _mm_storeu_si128((__m128i*)(hi + b * k + i),
                             _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_srai_epi32(q, 8), _mm512_set1_epi32(128))));
        }
#endif
        for (; i < k; i++) {
            const int32_t q = (int32_t)lrintf(r[i] * inv);
            lo[b * k + i] = (uint8_t)(q & 0xff);
            hi[b * k + i] = (uint8_t)((q >> 8) + 128);
        }
        qscale[b] = sc;
    }
}

#ifdef HAVE_I16_DOT
// Row b of x as int8 per block of 64 (scale amax / 127, round to nearest even), each stored + 128
// as vpdpbusd's unsigned operand, for the int8 panels at more than two batch rows (ptile_i8q).
// Per-block scales keep an outlier from coarsening its whole row: SmolLM2-135M's perplexity with
// every eetq product on such activations (simulated in torch, 1,024 tokens) was +0.14% over bf16 in
// 1,024-token windows and +0.9% in 64-token ones; one scale per row gave +2.7% and +2.9%.
static void quant_row_b64(const Act& x, int64_t b, int64_t k, uint8_t* q, float* scale) {
    const float* r = x.f + b * x.stride;
    for (int64_t t = 0; t < k; t += 64) {
        __m512 v[4], am = _mm512_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm512_loadu_ps(r + t + 16 * i);
            am = _mm512_max_ps(am, _mm512_abs_ps(v[i]));
        }
        const float amax = _mm512_reduce_max_ps(am);
        const __m512 iv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        for (int i = 0; i < 4; i++) {
            const __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v[i], iv)), _mm512_set1_epi32(128));
            _mm_storeu_si128((__m128i*)(q + b * k + t + 16 * i), _mm512_cvtepi32_epi8(u));
        }
        scale[(b * k + t) / 64] = amax / 127.f;
    }
}
#endif

#if defined(HAVE_AVX2_ONLY)
// Row b of x as int16 (quant_rows's scale and rounding: full range, one scale per row), for the
// AVX2 int8 panels, which widen the weights to int16 and multiply with vpmaddwd.
static void quant_row16(const Act& x, int64_t b, int64_t k, int16_t* q, float* qscale) {
    const float qmax = 32767.f;
    const float* r = x.f + b * x.stride;
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 am = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) am = _mm256_max_ps(am, _mm256_andnot_ps(sign, _mm256_loadu_ps(r + i)));
    __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
    a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
    float amax = _mm_cvtss_f32(_mm_max_ss(a4, _mm_movehdup_ps(a4)));
    for (; i < k; i++) amax = fmaxf(amax, fabsf(r[i]));
    const float inv = amax > 0.f ? qmax / amax : 0.f;
    const __m256 iv = _mm256_set1_ps(inv);
    i = 0;
    for (; i + 16 <= k; i += 16) {  // round to nearest even; packs interleaves the 128-bit lanes back
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + i), iv));
        const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + i + 8), iv));
        _mm256_storeu_si256((__m256i*)(q + b * k + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xd8));
    }
    for (; i < k; i++) q[b * k + i] = (int16_t)lrintf(r[i] * inv);
    qscale[b] = amax > 0.f ? amax / qmax : 0.f;
}
#endif

enum { OUT_STORE = 0, OUT_ADD = 1 };

template <int R, int BT>
static inline void tile(const Linear& L, int64_t r, const Act& x, int64_t b, float* out) {
    const int64_t k = L.k;
    switch (L.kind) {
        case KIND_BF16:
            tile_bf16<R, BT>((const uint16_t*)L.w + r * k, k, x.h + b * x.stride, x.stride, out);
            break;
        case KIND_I8:
#ifdef HAVE_I16_DOT
            if (x.qlo && L.rowsum) {
                tile_i8b<R, BT>((const int8_t*)L.w + r * k, k, x.qlo + b * k, x.qhi + b * k, k, L.rowsum + r,
                                x.qscale + b, out);
                break;
            }
#endif
            tile_i8<R, BT>((const int8_t*)L.w + r * k, k, x.f + b * x.stride, x.stride, out);
            break;
        case KIND_Q4:
#ifdef HAVE_Q4Q8
            if constexpr (R == 4 && BT == 1) {
                if (x.q8 && (r & 3) == 0) {  // a whole tile of four rows
                    const int64_t o = b * k;
                    const uint8_t* w = (const uint8_t*)L.w + r * (k / 2);
                    const int64_t g0 = r * (k / L.group) * 2;  // the tile's first group element
#ifdef HAVE_Q4Q8_512
                    if (L.group_kind == KIND_BF16)
                        tile_q4q8_4x1_512<KIND_BF16>(w, (const uint16_t*)L.groups + g0, k, L.group, x.q8 + o,
                                                     x.q8scale + o / 32, x.q8sum + o / 32, out);
                    else
                        tile_q4q8_4x1_512<KIND_F32>(w, (const float*)L.groups + g0, k, L.group, x.q8 + o,
                                                    x.q8scale + o / 32, x.q8sum + o / 32, out);
#else
                    if (L.group_kind == KIND_BF16)
                        tile_q4q8_4x1<KIND_BF16>(w, (const uint16_t*)L.groups + g0, k, L.group, x.q8 + o,
                                                 x.q8scale + o / 32, x.q8sum + o / 32, out);
                    else
                        tile_q4q8_4x1<KIND_F32>(w, (const float*)L.groups + g0, k, L.group, x.q8 + o,
                                                x.q8scale + o / 32, x.q8sum + o / 32, out);
#endif
                    break;
                }
            }
#endif
            tile_q4<R, BT>(L, r, x.f + b * x.stride, x.stride, out);
            break;
        default:
            tile_f32<R, BT>((const float*)L.w + r * k, k, x.f + b * x.stride, x.stride, out);
    }
}

// y[b, r - roff] = v * scale[r] + bias[r] (stored or added to what is there)
static inline void emit(const Linear& L, int64_t r, int64_t b, float v, float* y, int64_t ys, int64_t roff,
                        int mode, int rnd) {
    if (L.scale) v *= L.scale[r];
    if (L.bias) v += L.bias[r];
    if (rnd) v = round_bf16(v);
    float* p = y + b * ys + (r - roff);
    if (mode == OUT_ADD) {
        v += *p;
        if (rnd) v = round_bf16(v);
    }
    *p = v;
}

#if defined(__AVX512F__) || defined(HAVE_AVX2_ONLY)
// four bf16 roundings at once (round to nearest even; NaN kept)
static inline __m128 round_bf16_4(__m128 v) {
    __m128i u = _mm_castps_si128(v);
    __m128i r = _mm_add_epi32(u, _mm_add_epi32(_mm_set1_epi32(0x7fff), _mm_and_si128(_mm_srli_epi32(u, 16),
                                                                                      _mm_set1_epi32(1))));
    __m128 out = _mm_castsi128_ps(_mm_and_si128(r, _mm_set1_epi32((int)0xffff0000u)));
    return _mm_blendv_ps(out, v, _mm_cmpunord_ps(v, v));
}

// emit() for rows r..r+3 of batch row b, vectorised (the scalar epilogue cost as much as the
// dot products of a 4 x 4 tile at k = 576)
static inline void emit4(const Linear& L, int64_t r, int64_t b, __m128 v, float* y, int64_t ys, int64_t roff,
                         int mode, int rnd) {
    if (L.scale) v = _mm_mul_ps(v, _mm_loadu_ps(L.scale + r));
    if (L.bias) v = _mm_add_ps(v, _mm_loadu_ps(L.bias + r));
    if (rnd) v = round_bf16_4(v);
    float* p = y + b * ys + (r - roff);
    if (mode == OUT_ADD) {
        v = _mm_add_ps(v, _mm_loadu_ps(p));
        if (rnd) v = round_bf16_4(v);
    }
    _mm_storeu_ps(p, v);
}
#endif

#if defined(__AVX512F__)
// exp(x), sixteen at a time: 2^t * exp(r) with |r| <= ln2 / 2 and a degree-6 polynomial
// (relative error < 3e-7, expf's last bits); x is clamped to [-87, 88] (no inf, no denormals).
static inline __m512 exp16(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(t, ln2_hi, x);
    r = _mm512_fnmadd_ps(t, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.3888889e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3333333e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1666667e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666667e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, t);
}

// s[j] = exp(s[j] - m) for j < n (every s[j] <= m)
static inline void exp_shifted(float* s, int64_t n, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        _mm512_mask_storeu_ps(s + j, k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mv)));
    }
}

// sixteen bf16 roundings at once (round to nearest even; NaN kept), as float32 and as bf16 bits
static inline __m512i bf16_bits16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}
static inline __m512 round_bf16_16(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(v), 16)); }
#endif

#if defined(__AVX512F__)
// four batch rows per tile: wider tiles (5, 6) measured no faster, and 6 spills registers
#define TILE_BT 4
// Rows r..r+3 for batch rows b..b+BT-1 of a bf16 or float32 product: the four sums of a batch
// row come out of one hsum4 in the order emit4 stores them (no transpose, no buffer)
template <int BT>
static inline void tile4_emit(const Linear& L, int64_t r, const Act& x, int64_t b, float* y, int64_t ys,
                              int64_t roff, int mode, int rnd) {
    const int64_t k = L.k;
    __m512 acc[4][BT];
    if (L.kind == KIND_BF16) {
#if defined(__AVX512BF16__)
        dot_bf16<4, BT>((const uint16_t*)L.w + r * k, k, x.h + b * x.stride, x.stride, acc);
#else
        dot_fma<4, BT>((const uint16_t*)L.w + r * k, k, x.h + b * x.stride, x.stride, acc);
#endif
    } else {
        dot_fma<4, BT>((const float*)L.w + r * k, k, x.f + b * x.stride, x.stride, acc);
    }
    for (int j = 0; j < BT; j++)
        emit4(L, r, b + j, hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]), y, ys, roff, mode, rnd);
}

// rows r..r+3 for batch rows [b, B), TILE_BT at a time
static inline void rows4_emit(const Linear& L, int64_t r, const Act& x, int64_t b, int64_t B, float* y, int64_t ys,
                              int64_t roff, int mode, int rnd) {
    for (; b + TILE_BT <= B; b += TILE_BT) tile4_emit<TILE_BT>(L, r, x, b, y, ys, roff, mode, rnd);
    switch (B - b) {
        case 3: tile4_emit<3>(L, r, x, b, y, ys, roff, mode, rnd); break;
        case 2: tile4_emit<2>(L, r, x, b, y, ys, roff, mode, rnd); break;
        case 1: tile4_emit<1>(L, r, x, b, y, ys, roff, mode, rnd); break;
        default: break;
    }
}
#endif

// ------------------------------------------------------------------ packed weights
//
// llmcore_cpu/native/__init__.py repacks weights in place at load into panels of 16 rows in
// which one vector holds a k-group of all 16 rows. AVX-512: bf16 [n/16][k/2][16][2], int8
// [n/16][k/4][16][4] (one 64-byte vector); AVX2: float32 [n/16][k][16] (two 32-byte vectors,
// below). A product is then an outer product: a weight vector times an
// activation group broadcast to every lane gives 16 output rows per accumulator, with no
// horizontal sums, and each panel is one sequential stream. Measured on the 2-core EPYC
// against the row-major tiles: int8 single-row products 17.7 -> 30 GB/s (the machine's plain
// read rate), bf16 64-row products 310-360 -> 415-450 GFLOP/s.

#if defined(__AVX512F__)
static inline int32_t load_i32(const void* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

// emit() for rows r..r+15 of batch row b
static inline void emit16(const Linear& L, int64_t r, int64_t b, __m512 v, float* y, int64_t ys, int64_t roff,
                          int mode, int rnd) {
    if (L.scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(L.scale + r));
    if (L.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(L.bias + r));
    if (rnd) v = round_bf16_16(v);
    float* p = y + b * ys + (r - roff);
    if (mode == OUT_ADD) {
        v = _mm512_add_ps(v, _mm512_loadu_ps(p));
        if (rnd) v = round_bf16_16(v);
    }
    _mm512_storeu_ps(p, v);
}

// acc += (16 rows x 2 k of bf16 weights) . (the pair x[2kk], x[2kk + 1] in every lane)
static inline __m512 dot2_bf16(__m512 acc, __m512i w, int32_t xpair) {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_set1_epi32(xpair));
#else
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)));
    const uint32_t u = (uint32_t)xpair;
    acc = _mm512_fmadd_ps(we, _mm512_set1_ps(bf16_to_f32((uint16_t)(u & 0xffff))), acc);
    return _mm512_fmadd_ps(wo, _mm512_set1_ps(bf16_to_f32((uint16_t)(u >> 16))), acc);
#endif
}

// panels p..p+NR-1 (rows 16p..) x batch rows b..b+MB-1 of a packed bf16 product
template <int NR, int MB>
static inline void ptile_bf16(const Linear& L, int64_t p, const Act& x, int64_t b, float* y, int64_t ys,
                              int64_t roff, int mode, int rnd) {
    const int64_t k2 = L.k / 2, ps = k2 * 16;
    const uint32_t* w = (const uint32_t*)L.w + p * ps;
    const uint16_t* xh = x.h + b * x.stride;
    __m512 acc[NR][MB];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MB; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k2; kk++) {
        __m512i wv[NR];
        for (int i = 0; i < NR; i++) wv[i] = _mm512_loadu_si512(w + i * ps + kk * 16);
        for (int j = 0; j < MB; j++) {
            const int32_t xp = load_i32(xh + j * x.stride + 2 * kk);
            for (int i = 0; i < NR; i++) acc[i][j] = dot2_bf16(acc[i][j], wv[i], xp);
        }
    }
    for (int j = 0; j < MB; j++)
        for (int i = 0; i < NR; i++) emit16(L, (p + i) * 16, b + j, acc[i][j], y, ys, roff, mode, rnd);
}

#ifdef HAVE_I16_DOT
// One or two batch rows read NR panels as NR streams and wait on them: each panel's line this
// many lines ahead is prefetched
constexpr int64_t I8_PF_LINES = 32;
// the same for int8 panels and int16 activations as byte planes (tile_i8b_'s arithmetic)
template <int NR, int MB>
static inline void ptile_i8(const Linear& L, int64_t p, const Act& x, int64_t b, float* y, int64_t ys,
                            int64_t roff, int mode, int rnd) {
    const int64_t k = L.k, k4 = k / 4, ps = k4 * 64;
    const int8_t* w = (const int8_t*)L.w + p * ps;
    const uint8_t* xlo = x.qlo + b * k;
    const uint8_t* xhi = x.qhi + b * k;
    __m512i lo[NR][MB], hi[NR][MB];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MB; j++) lo[i][j] = hi[i][j] = _mm512_setzero_si512();
    for (int64_t kk = 0; kk < k4; kk++) {
        __m512i wv[NR];
        for (int i = 0; i < NR; i++) {
            if constexpr (MB <= 2) _mm_prefetch((const char*)(w + i * ps + (kk + I8_PF_LINES) * 64), _MM_HINT_T0);
            wv[i] = _mm512_loadu_si512(w + i * ps + kk * 64);
        }
        for (int j = 0; j < MB; j++) {
            const __m512i l = _mm512_set1_epi32(load_i32(xlo + j * k + 4 * kk));
            const __m512i h = _mm512_set1_epi32(load_i32(xhi + j * k + 4 * kk));
            for (int i = 0; i < NR; i++) {
                lo[i][j] = _mm512_dpbusd_epi32(lo[i][j], l, wv[i]);
                hi[i][j] = _mm512_dpbusd_epi32(hi[i][j], h, wv[i]);
            }
        }
    }
    for (int i = 0; i < NR; i++) {
        const __m512i rs128 = _mm512_slli_epi32(_mm512_loadu_si512(L.rowsum + (p + i) * 16), 7);
        for (int j = 0; j < MB; j++) {
            const __m512 h = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi[i][j], rs128));
            const __m512 v = _mm512_fmadd_ps(h, _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(lo[i][j]));
            emit16(L, (p + i) * 16, b + j, _mm512_mul_ps(v, _mm512_set1_ps(x.qscale[b + j])), y, ys, roff, mode, rnd);
        }
    }
}

// int8 panels x int8 activations per block of 64 (quant_row_b64), for more than two batch rows:
// one vpdpbusd per 64 products, twice the rate of the byte planes above and of bf16's vdpbf16ps
// (the panels are read from cache for every batch row, so the instruction count is what costs).
// Per block, the int32 sums less 128 x the block's weight sums (L.bsum) are scaled by the block's
// activation scale into float32 accumulators: 2 x 6 tiles hold 12 of each in the 32 registers.
template <int NR, int MB>
static inline void ptile_i8q(const Linear& L, int64_t p, const Act& x, int64_t b, float* y, int64_t ys,
                             int64_t roff, int mode, int rnd) {
    const int64_t k = L.k, nb = k / 64, ps = k * 16;
    const int8_t* w = (const int8_t*)L.w + p * ps;
    const uint8_t* xq = x.qb + b * k;
    const float* xs = x.qbscale + b * nb;
    __m512 f[NR][MB];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MB; j++) f[i][j] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < nb; blk++) {
        __m512i a[NR][MB];
        for (int i = 0; i < NR; i++)
            for (int j = 0; j < MB; j++) a[i][j] = _mm512_setzero_si512();
        for (int64_t kk = blk * 16; kk < blk * 16 + 16; kk++) {
            __m512i wv[NR];
            for (int i = 0; i < NR; i++) wv[i] = _mm512_loadu_si512(w + i * ps + kk * 64);
            for (int j = 0; j < MB; j++) {
                const __m512i u = _mm512_set1_epi32(load_i32(xq + j * k + 4 * kk));
                for (int i = 0; i < NR; i++) a[i][j] = _mm512_dpbusd_epi32(a[i][j], u, wv[i]);
            }
        }
        for (int i = 0; i < NR; i++) {
            const __m512i c = _mm512_loadu_si512(L.bsum + ((p + i) * nb + blk) * 16);
            for (int j = 0; j < MB; j++)
                f[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[i][j], c)),
                                          _mm512_set1_ps(xs[j * nb + blk]), f[i][j]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MB; j++) emit16(L, (p + i) * 16, b + j, f[i][j], y, ys, roff, mode, rnd);
}
#endif

// which panel kernel: bf16 x bf16, int8 x int16 byte planes, int8 x int8 per block of 64
enum { PT_BF16 = 0, PT_I16 = 1, PT_I8Q = 2 };

// panels p..p+NR-1 for every batch row, MB at a time, then the remainder
template <int NR, int MB, int PT>
static inline void ptile(const Linear& L, int64_t p, const Act& x, int64_t b, float* y, int64_t ys, int64_t roff,
                         int mode, int rnd) {
#ifdef HAVE_I16_DOT
    if constexpr (PT == PT_I16) return ptile_i8<NR, MB>(L, p, x, b, y, ys, roff, mode, rnd);
    if constexpr (PT == PT_I8Q) return ptile_i8q<NR, MB>(L, p, x, b, y, ys, roff, mode, rnd);
#endif
    if constexpr (PT == PT_BF16) ptile_bf16<NR, MB>(L, p, x, b, y, ys, roff, mode, rnd);
}

template <int NR, int MB, int PT>
static inline void pcols(const Linear& L, int64_t p, const Act& x, int64_t B, float* y, int64_t ys, int64_t roff,
                         int mode, int rnd) {
    int64_t b = 0;
    for (; b + MB <= B; b += MB) ptile<NR, MB, PT>(L, p, x, b, y, ys, roff, mode, rnd);
    for (; b + 4 <= B; b += 4) ptile<NR, 4, PT>(L, p, x, b, y, ys, roff, mode, rnd);
    for (; b + 2 <= B; b += 2) ptile<NR, 2, PT>(L, p, x, b, y, ys, roff, mode, rnd);
    for (; b < B; b++) ptile<NR, 1, PT>(L, p, x, b, y, ys, roff, mode, rnd);
}

// rows [r0, r1) (multiples of 16) of a packed product: two panels by eight batch rows for
// batches (24 of 32 registers hold sums), four panels at a time for one or two rows
template <int PT>
static void prows(const Linear& L, int64_t r0, int64_t r1, const Act& x, int64_t B, float* y, int64_t ys,
                  int64_t roff, int mode, int rnd) {
    int64_t p = r0 / 16;
    const int64_t p1 = r1 / 16;
    if (B <= 2) {
        for (; p + 4 <= p1; p += 4) pcols<4, 2, PT>(L, p, x, B, y, ys, roff, mode, rnd);
        for (; p + 2 <= p1; p += 2) pcols<2, 2, PT>(L, p, x, B, y, ys, roff, mode, rnd);
    } else if (PT == PT_I16) {
        for (; p + 2 <= p1; p += 2) pcols<2, 4, PT>(L, p, x, B, y, ys, roff, mode, rnd);
    } else if (PT == PT_I8Q) {
        for (; p + 2 <= p1; p += 2) pcols<2, 6, PT>(L, p, x, B, y, ys, roff, mode, rnd);
    } else {
        for (; p + 2 <= p1; p += 2) pcols<2, 8, PT>(L, p, x, B, y, ys, roff, mode, rnd);
    }
    for (; p < p1; p++) pcols<1, PT == PT_I8Q ? 6 : 8, PT>(L, p, x, B, y, ys, roff, mode, rnd);
}
#endif

#if defined(HAVE_AVX2_ONLY)
// float32 panels for AVX2 + FMA: [n/16][k][16], one k of 16 rows in two 8-lane vectors. A tile
// is up to six batch rows by one panel, a 6 x 16 outer product per k (12 accumulators, two
// weight loads, six broadcasts: the register budget of the 16 ymm). Measured on the 2-core EPYC
// (Zen 3) against the row-major tiles and torch's float32 GEMM, both threads: 64 x 3072 x 576
// 105 GFLOP/s (torch 44-66), 512 x 576 x 1536 119 (torch 93). The accumulators are named, not
// an array: GCC 12 kept a __m256 array in memory and stored all of it every k (47 GFLOP/s).
#define PF32_ROW(i)                                                               \
    if constexpr (MB > i) {                                                       \
        const __m256 xb = _mm256_broadcast_ss(xr + i * xs + kk);                  \
        a##i##0 = _mm256_fmadd_ps(w0, xb, a##i##0);                               \
        a##i##1 = _mm256_fmadd_ps(w1, xb, a##i##1);                               \
    }
#define PF32_EMIT(i)                                                                                          \
    if constexpr (MB > i) {                                                                                   \
        emit4(L, r, b + i, _mm256_castps256_ps128(a##i##0), y, ys, roff, mode, rnd);                          \
        emit4(L, r + 4, b + i, _mm256_extractf128_ps(a##i##0, 1), y, ys, roff, mode, rnd);                   \
        emit4(L, r + 8, b + i, _mm256_castps256_ps128(a##i##1), y, ys, roff, mode, rnd);                      \
        emit4(L, r + 12, b + i, _mm256_extractf128_ps(a##i##1, 1), y, ys, roff, mode, rnd);                  \
    }

// panel p (rows 16p..16p+15) x batch rows b..b+MB-1
template <int MB>
static inline void ptile_f32(const Linear& L, int64_t p, const Act& x, int64_t b, float* y, int64_t ys,
                             int64_t roff, int mode, int rnd) {
    const int64_t k = L.k, xs = x.stride, r = p * 16;
    const float* w = (const float*)L.w + p * k * 16;
    const float* xr = x.f + b * xs;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
           a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    for (int64_t kk = 0; kk < k; kk++) {
        const __m256 w0 = _mm256_loadu_ps(w + kk * 16), w1 = _mm256_loadu_ps(w + kk * 16 + 8);
        PF32_ROW(0) PF32_ROW(1) PF32_ROW(2) PF32_ROW(3) PF32_ROW(4) PF32_ROW(5)
    }
    PF32_EMIT(0) PF32_EMIT(1) PF32_EMIT(2) PF32_EMIT(3) PF32_EMIT(4) PF32_EMIT(5)
}
#undef PF32_ROW
#undef PF32_EMIT

// rows [r0, r1) (multiples of 16) of a packed float32 product: each panel for every batch row,
// six at a time (the panel stays in L1/L2 while the activations stream past it)
static void prows_f32(const Linear& L, int64_t r0, int64_t r1, const Act& x, int64_t B, float* y, int64_t ys,
                      int64_t roff, int mode, int rnd) {
    for (int64_t p = r0 / 16; p < r1 / 16; p++) {
        int64_t b = 0;
        for (; b + 6 <= B; b += 6) ptile_f32<6>(L, p, x, b, y, ys, roff, mode, rnd);
        switch (B - b) {
            case 5: ptile_f32<5>(L, p, x, b, y, ys, roff, mode, rnd); break;
            case 4: ptile_f32<4>(L, p, x, b, y, ys, roff, mode, rnd); break;
            case 3: ptile_f32<3>(L, p, x, b, y, ys, roff, mode, rnd); break;
            case 2: ptile_f32<2>(L, p, x, b, y, ys, roff, mode, rnd); break;
            case 1: ptile_f32<1>(L, p, x, b, y, ys, roff, mode, rnd); break;
            default: break;
        }
    }
}

// int8 panels on AVX2, in the AVX-512 layout [n/16][k/4][16][4] (one 64-byte line per k-group of
// four: rows 4i..4i+3 in bytes 16i..16i+15), times int16 activations (quant_row16): each 16-byte
// quarter widens to int16 (vpmovsxbw) and vpmaddwd multiplies it by the row's four activations
// broadcast, so an int32 lane sums row r's k-pair (0, 1) or (2, 3), 16 products per instruction
// where a float32 FMA does 8. A tile is up to three batch rows by one panel (12 accumulators, four
// weight vectors, one broadcast: the 16 ymm). Measured standalone on the 2-core EPYC (Zen 3), both
// threads, 64 x 576 x 1536 and 64 x 1536 x 576: 280-310 GOP/s where the float32 panels did 187-194.
// An int32 lane holds at most 512 products of |w| <= 128 and |q| <= 32767 (< 2^31), so the sums go
// to float32 every 1024 k (one chunk at SmolLM2's k = 576; two at 1536); within a chunk they are exact.
#define PI8_ROW(i)                                                                                 \
    if constexpr (MB > i) {                                                                        \
        int64_t xv;                                                                                \
        memcpy(&xv, xq + i * k + 4 * kk, 8);                                                       \
        const __m256i xb = _mm256_set1_epi64x(xv);                                                 \
        a##i##0 = _mm256_add_epi32(a##i##0, _mm256_madd_epi16(w0, xb));                            \
        a##i##1 = _mm256_add_epi32(a##i##1, _mm256_madd_epi16(w1, xb));                            \
        a##i##2 = _mm256_add_epi32(a##i##2, _mm256_madd_epi16(w2, xb));                            \
        a##i##3 = _mm256_add_epi32(a##i##3, _mm256_madd_epi16(w3, xb));                            \
    }
// lanes [r0 r0' r1 r1' | r2 r2' r3 r3'] and [r4 ... r7'] -> pair sums [r0 r1 r4 r5 | r2 r3 r6 r7]
#define PI8_FOLD(i)                                                                                \
    if constexpr (MB > i) {                                                                        \
        f[i][0] = _mm256_add_ps(f[i][0], _mm256_hadd_ps(_mm256_cvtepi32_ps(a##i##0), _mm256_cvtepi32_ps(a##i##1))); \
        f[i][1] = _mm256_add_ps(f[i][1], _mm256_hadd_ps(_mm256_cvtepi32_ps(a##i##2), _mm256_cvtepi32_ps(a##i##3))); \
    }

// panel p (rows 16p..16p+15) x batch rows b..b+MB-1
template <int MB>
static inline void ptile_i8a(const Linear& L, int64_t p, const Act& x, int64_t b, float* y, int64_t ys,
                             int64_t roff, int mode, int rnd) {
    const int64_t k = L.k, k4 = k / 4, r = p * 16;
    const int8_t* w = (const int8_t*)L.w + p * k * 16;
    const int16_t* xq = x.q16 + b * k;
    __m256 f[MB][2];
    for (int i = 0; i < MB; i++) f[i][0] = f[i][1] = _mm256_setzero_ps();
    for (int64_t c0 = 0; c0 < k4; c0 += 256) {
        const int64_t c1 = c0 + 256 < k4 ? c0 + 256 : k4;
        __m256i a00 = _mm256_setzero_si256(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
                a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
        for (int64_t kk = c0; kk < c1; kk++) {
            const int8_t* wk = w + kk * 64;
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)wk));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wk + 16)));
            const __m256i w2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wk + 32)));
            const __m256i w3 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wk + 48)));
            PI8_ROW(0) PI8_ROW(1) PI8_ROW(2)
        }
        PI8_FOLD(0) PI8_FOLD(1) PI8_FOLD(2)
        (void)a10; (void)a11; (void)a12; (void)a13; (void)a20; (void)a21; (void)a22; (void)a23;
    }
    for (int i = 0; i < MB; i++) {
        const __m256 s = _mm256_set1_ps(x.qscale[b + i]);
        for (int h = 0; h < 2; h++) {  // 64-bit pairs back in row order: rows 8h..8h+7
            const __m256 v = _mm256_mul_ps(
                _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(f[i][h]), 0xd8)), s);
            emit4(L, r + 8 * h, b + i, _mm256_castps256_ps128(v), y, ys, roff, mode, rnd);
            emit4(L, r + 8 * h + 4, b + i, _mm256_extractf128_ps(v, 1), y, ys, roff, mode, rnd);
        }
    }
}
#undef PI8_ROW
#undef PI8_FOLD

// rows [r0, r1) (multiples of 16) of a packed int8 product: each panel for every batch row,
// three at a time
static void prows_i8a(const Linear& L, int64_t r0, int64_t r1, const Act& x, int64_t B, float* y, int64_t ys,
                      int64_t roff, int mode, int rnd) {
    for (int64_t p = r0 / 16; p < r1 / 16; p++) {
        int64_t b = 0;
        for (; b + 3 <= B; b += 3) ptile_i8a<3>(L, p, x, b, y, ys, roff, mode, rnd);
        if (B - b == 2) ptile_i8a<2>(L, p, x, b, y, ys, roff, mode, rnd);
        else if (B - b == 1) ptile_i8a<1>(L, p, x, b, y, ys, roff, mode, rnd);
    }
}
#endif

static void rows_q4(const Linear& L, int64_t r0, int64_t r1, const Act& x, int64_t B, float* y, int64_t ys,
                    int64_t roff, int mode, int rnd);

// rows [r0, r1) of y = x W^T for all B batch rows
template <int R>
static void rows_block(const Linear& L, int64_t r0, int64_t r1, const Act& x, int64_t B, float* y,
                       int64_t ys, int64_t roff, int mode, int rnd) {
    const int BT = 4;
    float out[R * BT];
    int64_t r = r0;
    if (L.kind == KIND_Q4 && B > Q4_INT_ROWS) return rows_q4(L, r0, r1, x, B, y, ys, roff, mode, rnd);
#ifdef HAVE_Q4Q8
    if (L.kind == KIND_Q4 && x.q8) {  // the integer tiles, each four-row tile over every batch row (from L1)
        float out4[16];
        for (; r + 4 <= r1; r += 4) {
            int64_t b = 0;
#ifdef HAVE_Q4Q8_512
            const uint8_t* w = (const uint8_t*)L.w + r * (L.k / 2);
            const int64_t g0 = r * (L.k / L.group) * 2;  // the tile's first group element
            for (; b + 4 <= B; b += 4) {
                if (L.group_kind == KIND_BF16)
                    tile_q4q8_4xn_512<KIND_BF16, 4>(w, (const uint16_t*)L.groups + g0, L.k, L.group, x.q8 + b * L.k,
                                                    x.q8scale + b * L.k / 32, x.q8sum + b * L.k / 32, out4);
                else
                    tile_q4q8_4xn_512<KIND_F32, 4>(w, (const float*)L.groups + g0, L.k, L.group, x.q8 + b * L.k,
                                                   x.q8scale + b * L.k / 32, x.q8sum + b * L.k / 32, out4);
                for (int n = 0; n < 4; n++) emit4(L, r, b + n, _mm_loadu_ps(out4 + 4 * n), y, ys, roff, mode, rnd);
            }
#endif
            for (; b < B; b++) {
                tile<4, 1>(L, r, x, b, out4);
                emit4(L, r, b, _mm_loadu_ps(out4), y, ys, roff, mode, rnd);
            }
        }
        for (; r < r1; r++)
            for (int64_t b = 0; b < B; b++) {
                tile<1, 1>(L, r, x, b, out);
                emit(L, r, b, out[0], y, ys, roff, mode, rnd);
            }
        return;
    }
#endif
#if defined(__AVX512F__)
    if (L.packed) {  // __init__.py packs only what these kernels cover, n and chunks in whole panels
#ifdef HAVE_I16_DOT
        if (L.kind == KIND_I8 && x.qb) return prows<PT_I8Q>(L, r0, r1, x, B, y, ys, roff, mode, rnd);
        if (L.kind == KIND_I8) return prows<PT_I16>(L, r0, r1, x, B, y, ys, roff, mode, rnd);
#endif
        return prows<PT_BF16>(L, r0, r1, x, B, y, ys, roff, mode, rnd);
    }
    if (R == 4 && (L.kind == KIND_BF16 || L.kind == KIND_F32)) {
        for (; r + 4 <= r1; r += 4) rows4_emit(L, r, x, 0, B, y, ys, roff, mode, rnd);
    }
#elif defined(HAVE_AVX2_ONLY)
    if (L.packed) {  // __init__.py packs float32 and int8 (n and chunks in whole panels, k % 4 == 0)
        if (L.kind == KIND_I8) return prows_i8a(L, r0, r1, x, B, y, ys, roff, mode, rnd);
        return prows_f32(L, r0, r1, x, B, y, ys, roff, mode, rnd);
    }
#endif
    // row-major int8 (and, with AVX-512, only the rows left over above): tiles into a buffer
    for (; r + R <= r1; r += R) {
        int64_t b = 0;
        for (; b + BT <= B; b += BT) {
            tile<R, BT>(L, r, x, b, out);
#if defined(__AVX512F__) || defined(HAVE_AVX2_ONLY)
            if constexpr (R == 4 && BT == 4) {
                __m128 c0 = _mm_loadu_ps(out), c1 = _mm_loadu_ps(out + 4), c2 = _mm_loadu_ps(out + 8),
                       c3 = _mm_loadu_ps(out + 12);
                _MM_TRANSPOSE4_PS(c0, c1, c2, c3);  // now c_j = four rows of batch row b + j
                emit4(L, r, b, c0, y, ys, roff, mode, rnd);
                emit4(L, r, b + 1, c1, y, ys, roff, mode, rnd);
                emit4(L, r, b + 2, c2, y, ys, roff, mode, rnd);
                emit4(L, r, b + 3, c3, y, ys, roff, mode, rnd);
                continue;
            }
#endif
            for (int i = 0; i < R; i++)
                for (int j = 0; j < BT; j++) emit(L, r + i, b + j, out[i * BT + j], y, ys, roff, mode, rnd);
        }
        for (; b < B; b++) {
            tile<R, 1>(L, r, x, b, out);
#if defined(__AVX512F__) || defined(HAVE_AVX2_ONLY)
            if constexpr (R == 4) {
                emit4(L, r, b, _mm_loadu_ps(out), y, ys, roff, mode, rnd);
                continue;
            }
#endif
            for (int i = 0; i < R; i++) emit(L, r + i, b, out[i], y, ys, roff, mode, rnd);
        }
    }
    for (; r < r1; r++)
        for (int64_t b = 0; b < B; b++) {
            tile<1, 1>(L, r, x, b, out);
            emit(L, r, b, out[0], y, ys, roff, mode, rnd);
        }
}

// 4-bit rows for more than two batch rows: four rows at a time dequantized into a float32
// buffer (L1-resident at k <= 2048), then the row-major float32 tiles over every batch row. With
// the AVX2 float32 panels and many batch rows, sixteen rows at a time into a panel for ptile_f32
// (the scatter into the panel costs ~one store per weight, paid once for all the batch rows).
static void rows_q4(const Linear& L, int64_t r0, int64_t r1, const Act& x, int64_t B, float* y, int64_t ys,
                    int64_t roff, int mode, int rnd) {
    static thread_local std::vector<float> buf, row;
    if ((int64_t)buf.size() < 16 * L.k) buf.resize(16 * L.k);
    Linear F = L;
    F.kind = KIND_F32;
    F.packed = 0;
    F.scale = nullptr;
    F.w = buf.data();
#if defined(HAVE_AVX2_ONLY)
    if (B > 16) {
        if ((int64_t)row.size() < L.k) row.resize(L.k);
        Linear P = F;
        P.packed = 1;
        P.n = 16;
        for (; r0 + 16 <= r1; r0 += 16) {
            for (int64_t i = 0; i < 16; i++) {
                q4_dequant_row(L, r0 + i, row.data());
                for (int64_t t = 0; t < L.k; t++) buf[t * 16 + i] = row[t];
            }
            P.bias = L.bias ? L.bias + r0 : nullptr;  // P's rows 0..15 are L's r0..r0+15
            prows_f32(P, 0, 16, x, B, y, ys, roff - r0, mode, rnd);
        }
    }
#endif
    for (int64_t r = r0; r < r1; r += 4) {
        const int64_t R = r1 - r < 4 ? r1 - r : 4;
        for (int64_t i = 0; i < R; i++) q4_dequant_row(L, r + i, buf.data() + i * L.k);
        F.bias = L.bias ? L.bias + r : nullptr;  // F's rows 0..R-1 are L's r..r+R-1
        rows_block<4>(F, 0, R, x, B, y, ys, roff - r, mode, rnd);
    }
}

// Inside a parallel region: the rows split over the threads in chunks of 16 (dynamic,
// so a thread slowed by the other process on its core does not hold the rest back).
// Rows per work item: about eight items per thread, so each streams long runs of weight rows
// (the prefetchers follow a run; a 16-row item was 9-18 KB) while a thread slowed by another
// process on its core can still hand items to the other; at least 16 rows.
static inline int64_t chunk_rows(int64_t n, int64_t B, int packed) {
    const int64_t T = omp_get_num_threads();
    int64_t c = n / (8 * T);
    if (B > 16) c = c < 64 ? c : 64;  // many rows: items small enough to balance
    // packed: whole 16-row panels, in the 2- or 4-panel groups of the widest tiles (prows)
#if defined(HAVE_AVX2_ONLY)
    // float32 panels, many rows: one panel per item (a 6 x 16 tile pass over the batch rows is
    // >= 10 us at 64 rows), so two threads finish within one panel of each other (a 576-row
    // product in 64-row items split 5:4)
    if (packed && B > 16) return 16;
#endif
    const int64_t q = packed ? (B <= 2 ? 64 : 32) : 4;
    c = (c + q - 1) / q * q;
    return c < 16 ? 16 : c;
}

// Many rows quantized once for all the threads: the rows split over the threads into one
// thread's buffers of qn and sn elements (copyprivate hands every thread the pointers; the omp
// for's barrier publishes the rows). quant(b, q, s) writes row b.
template <typename Q, typename F>
static void quant_shared(int64_t B, int64_t qn, int64_t sn, Q*& qp, float*& sp, F quant) {
    static thread_local std::vector<Q> q;
    static thread_local std::vector<float> qs;
    Q* qloc = nullptr;
    float* sloc = nullptr;
#pragma omp single copyprivate(qloc, sloc)
    {
        if ((int64_t)q.size() < qn) q.resize(qn);
        if ((int64_t)qs.size() < sn) qs.resize(sn);
        qloc = q.data();
        sloc = qs.data();
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) quant(b, qloc, sloc);
    qp = qloc;
    sp = sloc;
}

// int8 and 4-bit weights: each thread quantizes the activations for itself (no barrier; B x k is
// small), except where quant_shared splits many rows over the threads
static Act with_quant(const Linear& L, const Act& x, int64_t B) {
#ifdef HAVE_I16_DOT
    if (L.kind == KIND_I8 && L.packed && L.bsum && B > 2) {  // int8 per block of 64 for ptile_i8q
        uint8_t* qp;
        float* sp;
        quant_shared<uint8_t>(B, B * L.k, B * L.k / 64, qp, sp,
                              [&](int64_t b, uint8_t* q, float* sc) { quant_row_b64(x, b, L.k, q, sc); });
        Act a = x;
        a.qb = qp;
        a.qbscale = sp;
        return a;
    }
    if (L.kind == KIND_I8) {
        static thread_local std::vector<uint8_t> q;
        static thread_local std::vector<float> qs;
        if ((int64_t)q.size() < 2 * B * L.k) q.resize(2 * B * L.k);
        if ((int64_t)qs.size() < B) qs.resize(B);
        quant_rows(x, B, L.k, q.data(), q.data() + B * L.k, qs.data());
        Act a = x;
        a.qlo = q.data();
        a.qhi = q.data() + B * L.k;
        a.qscale = qs.data();
        return a;
    }
#endif
#if defined(HAVE_AVX2_ONLY)
    if (L.kind == KIND_I8 && L.packed) {
        // one or two rows: each thread quantizes them itself (no barrier); more: the rows split
        // over the threads (quant_shared). A 64-row quantization done by every thread cost ~25%
        // of a 64 x 576 x 1536 product.
        static thread_local std::vector<int16_t> q;
        static thread_local std::vector<float> qs;
        int16_t* qp;
        float* sp;
        if (B <= 2) {
            if ((int64_t)q.size() < B * L.k) q.resize(B * L.k);
            if ((int64_t)qs.size() < B) qs.resize(B);
            qp = q.data();
            sp = qs.data();
            for (int64_t b = 0; b < B; b++) quant_row16(x, b, L.k, qp, sp);
        } else {
            quant_shared<int16_t>(B, B * L.k, B, qp, sp,
                                  [&](int64_t b, int16_t* q16, float* sc) { quant_row16(x, b, L.k, q16, sc); });
        }
        Act a = x;
        a.q16 = qp;
        a.qscale = sp;
        return a;
    }
#endif
#ifdef HAVE_Q4Q8
    if (L.kind == KIND_Q4 && B <= Q4_INT_ROWS) {  // the integer tiles (rows_q4 takes more batch rows, in float32)
        static thread_local std::vector<int8_t> q;
        static thread_local std::vector<float> qs;
        if ((int64_t)q.size() < B * L.k) q.resize(B * L.k);
        if ((int64_t)qs.size() < 2 * B * L.k / 32) qs.resize(2 * B * L.k / 32);
        quant_q8_blocks(x, B, L.k, q.data(), qs.data(), qs.data() + B * L.k / 32);
        Act a = x;
        a.q8 = q.data();
        a.q8scale = qs.data();
        a.q8sum = qs.data() + B * L.k / 32;
        return a;
    }
#endif
    (void)L; (void)B;
    return x;
}

static void linear_par(const Linear& L, const Act& x0, int64_t B, float* y, int64_t ys, int mode, int rnd) {
    const Act x = with_quant(L, x0, B);
    const int64_t chunk = chunk_rows(L.n, B, L.packed);
    const int64_t nchunks = (L.n + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t r0 = c * chunk, r1 = r0 + chunk < L.n ? r0 + chunk : L.n;
        rows_block<4>(L, r0, r1, x, B, y, ys, 0, mode, rnd);
    }
}


#if defined(HAVE_AVX2_ONLY)
// exp(x) for 8 lanes, as exp16 (same range reduction and polynomial); 2^t built in the exponent bits
static inline __m256 exp8(__m256 x) {
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 t = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(t, ln2_hi, x);
    r = _mm256_fnmadd_ps(t, ln2_lo, r);
    __m256 p = _mm256_set1_ps(1.3888889e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3333333e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1666667e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666667e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    // t in [-126, 127] after the clamp: a normal power of two (at x = -87, 2^-126 times p >= 0.5)
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(t), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// eight bf16 roundings at once (round to nearest even; NaN kept), as round_bf16_4
static inline __m256 round_bf16_8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                           _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    const __m256 out = _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
    return _mm256_blendv_ps(out, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
#endif

// The gate/up product with SiLU(gate) * up as its epilogue: chunk c computes gate rows
// [r0, r1) and the matching up rows [I + r0, I + r1) into the thread's scratch (B x 2 x 16)
// and writes act[b, r] (float32 and bf16) directly, so no gate/up buffer and no pass after.
static inline float silu(float g) { return g / (1.f + expf(-g)); }

static void gate_up_par(const Linear& L, const Act& x0, int64_t B, float* scratch, float* act, uint16_t* act_h,
                        int rnd) {
    const Act x = with_quant(L, x0, B);
    // few batch rows: longer runs per item (four panels); many: two panels (the 2 x 8 tiles);
    // scratch holds B x 2 x 64
    const int64_t chunk = B <= 16 ? 64 : 32, I = L.n / 2;
    const int64_t nchunks = (I + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t r0 = c * chunk, r1 = r0 + chunk < I ? r0 + chunk : I;
        rows_block<4>(L, r0, r1, x, B, scratch, 2 * chunk, r0, OUT_STORE, rnd);
        rows_block<4>(L, I + r0, I + r1, x, B, scratch + chunk, 2 * chunk, I + r0, OUT_STORE, rnd);
        int64_t b = 0;
#if defined(__AVX512F__)
        // vectorised epilogue (scalar expf here was a third of the gate/up time at 64 rows)
        for (; b < B; b++) {
            const float* gs = scratch + b * 2 * chunk;
            for (int64_t r = r0; r < r1; r += 16) {
                const __mmask16 m = r1 - r >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (r1 - r)) - 1);
                const __m512 g = _mm512_maskz_loadu_ps(m, gs + (r - r0)), u = _mm512_maskz_loadu_ps(m, gs + chunk + (r - r0));
                __m512 sg = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
                __m512 v = rnd ? round_bf16_16(_mm512_mul_ps(round_bf16_16(sg), u)) : _mm512_mul_ps(sg, u);
                _mm512_mask_storeu_ps(act + b * I + r, m, v);
                _mm256_mask_storeu_epi16(act_h + b * I + r, m, _mm512_cvtepi32_epi16(bf16_bits16(v)));
            }
        }
#elif defined(HAVE_AVX2_ONLY)
        // the same 8 lanes at a time (scalar expf here: ~30 ms of a 280 ms 64-row step on the EPYC)
        for (; b < B; b++) {
            const float* gs = scratch + b * 2 * chunk;
            int64_t r = r0;
            for (; r + 8 <= r1; r += 8) {
                const __m256 g = _mm256_loadu_ps(gs + (r - r0)), u = _mm256_loadu_ps(gs + chunk + (r - r0));
                const __m256 sg = _mm256_div_ps(
                    g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
                const __m256 v = rnd ? round_bf16_8(_mm256_mul_ps(round_bf16_8(sg), u)) : _mm256_mul_ps(sg, u);
                _mm256_storeu_ps(act + b * I + r, v);
                for (int i = 0; i < 8; i++) act_h[b * I + r + i] = f32_to_bf16(act[b * I + r + i]);
            }
            for (; r < r1; r++) {
                const float g = gs[r - r0], u = gs[chunk + (r - r0)];
                const float v = rnd ? round_bf16(round_bf16(silu(g)) * u) : silu(g) * u;
                act[b * I + r] = v;
                act_h[b * I + r] = f32_to_bf16(v);
            }
        }
#endif
        for (; b < B; b++)
            for (int64_t r = r0; r < r1; r++) {
                const float g = scratch[b * 2 * chunk + (r - r0)], u = scratch[b * 2 * chunk + chunk + (r - r0)];
                const float v = rnd ? round_bf16(round_bf16(silu(g)) * u) : silu(g) * u;
                act[b * I + r] = v;
                act_h[b * I + r] = f32_to_bf16(v);
            }
    }
}

// ------------------------------------------------------------------ small ops

// out = bf16?(normalized x) * w, also written as bf16 for the next product
static void rmsnorm_row(const float* x, const float* w, int64_t n, float eps, int rnd, float* out, uint16_t* out_h) {
#if defined(__AVX512F__)
    // vectorised (the scalar loop, run for every row by both threads twice a layer, was ~10%
    // of a 64-row step); the sum of squares stays in float64 as before
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
        s0 = _mm512_fmadd_pd(lo, lo, s0);
        s1 = _mm512_fmadd_pd(hi, hi, s1);
    }
    const double ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf((float)(ss / n) + eps));
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv);
        const __m512 wv = _mm512_maskz_loadu_ps(m, w + i);
        v = rnd ? round_bf16_16(_mm512_mul_ps(round_bf16_16(v), wv)) : _mm512_mul_ps(v, wv);
        _mm512_mask_storeu_ps(out + i, m, v);
        if (out_h) _mm256_mask_storeu_epi16(out_h + i, m, _mm512_cvtepi32_epi16(bf16_bits16(v)));
    }
#else
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int64_t i = 0; i < n; i++) {
        float v = x[i] * inv;
        if (rnd) v = round_bf16(round_bf16(v) * w[i]);
        else v = v * w[i];
        out[i] = v;
        if (out_h) out_h[i] = f32_to_bf16(v);
    }
#endif
}

static void rope(float* v, const float* cos, const float* sin, int64_t d, int rnd) {
    const int64_t h = d / 2;
#if defined(__AVX512F__)
    if (h % 16 == 0) {  // the two halves 16 at a time (the scalar loop's bf16 rounding did not vectorise)
        for (int64_t i = 0; i < h; i += 16) {
            const __m512 a = _mm512_loadu_ps(v + i), b = _mm512_loadu_ps(v + h + i);
            __m512 lo = _mm512_fnmadd_ps(b, _mm512_loadu_ps(sin + i), _mm512_mul_ps(a, _mm512_loadu_ps(cos + i)));
            __m512 hi = _mm512_fmadd_ps(a, _mm512_loadu_ps(sin + h + i), _mm512_mul_ps(b, _mm512_loadu_ps(cos + h + i)));
            if (rnd) {
                lo = round_bf16_16(lo);
                hi = round_bf16_16(hi);
            }
            _mm512_storeu_ps(v + i, lo);
            _mm512_storeu_ps(v + h + i, hi);
        }
        return;
    }
#endif
    float tmp[512];
    for (int64_t i = 0; i < h; i++) {
        tmp[i] = v[i] * cos[i] - v[i + h] * sin[i];
        tmp[i + h] = v[i + h] * cos[i + h] + v[i] * sin[i + h];
    }
    for (int64_t i = 0; i < d; i++) v[i] = rnd ? round_bf16(tmp[i]) : tmp[i];
}

// The paged K/V rows of one KV head are 2-4 cache lines every n_kv_heads rows, in blocks of 8
// tokens scattered over the cache: the hardware prefetchers lose the stream at every block. The
// kernels prefetch each key's row KPF keys ahead and a chunk's V rows while its scores are made.
constexpr int64_t KPF = 16;
static inline void kv_prefetch(const void* c, int64_t off, int esz, int64_t rowb) {
    const char* p = (const char*)c + off * esz;
    for (int64_t b = 0; b < rowb; b += 64) __builtin_prefetch(p + b, 0, 3);
}

static inline float cache_at(const void* c, int kind, int64_t idx) {
    return kind == KIND_BF16 ? bf16_to_f32(((const uint16_t*)c)[idx]) : ((const float*)c)[idx];
}

static inline float dot_cache(const float* q, const void* c, int kind, int64_t off, int64_t d) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
        __mmask16 m = d - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - i)) - 1);
        __m512 kv = kind == KIND_BF16 ? load_bf16_as_f32((const uint16_t*)c + off + i, m)
                                      : _mm512_maskz_loadu_ps(m, (const float*)c + off + i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), kv, acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0.f;
    int64_t i = 0;
#if defined(HAVE_AVX2_ONLY)
    __m256 acc = _mm256_setzero_ps();
    if (kind == KIND_BF16)
        for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), ld8((const uint16_t*)c + off + i), acc);
    else
        for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), ld8((const float*)c + off + i), acc);
    s = hsum8(acc);
#endif
    for (; i < d; i++) s += q[i] * cache_at(c, kind, off + i);
    return s;
#endif
}

static inline void axpy_cache(float* acc, float a, const void* c, int kind, int64_t off, int64_t d) {
#if defined(__AVX512F__)
    __m512 av = _mm512_set1_ps(a);
    for (int64_t i = 0; i < d; i += 16) {
        __mmask16 m = d - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - i)) - 1);
        __m512 vv = kind == KIND_BF16 ? load_bf16_as_f32((const uint16_t*)c + off + i, m)
                                      : _mm512_maskz_loadu_ps(m, (const float*)c + off + i);
        _mm512_mask_storeu_ps(acc + i, m, _mm512_fmadd_ps(av, vv, _mm512_maskz_loadu_ps(m, acc + i)));
    }
#else
    int64_t i = 0;
#if defined(HAVE_AVX2_ONLY)
    const __m256 av = _mm256_set1_ps(a);
    if (kind == KIND_BF16)
        for (; i + 8 <= d; i += 8)
            _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(av, ld8((const uint16_t*)c + off + i), _mm256_loadu_ps(acc + i)));
    else
        for (; i + 8 <= d; i += 8)
            _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(av, ld8((const float*)c + off + i), _mm256_loadu_ps(acc + i)));
#endif
    for (; i < d; i++) acc[i] += a * cache_at(c, kind, off + i);
#endif
}

// One query row, one head: softmax(q K^T * scale) V over the row's context, block by block
// with a running max (no score buffer), reading K/V where the block table says they are.
static void attend(const Model& M, const Layer& L, const float* q, int64_t kvh, const int64_t* table,
                   int64_t ctx, float* out) {
    const int64_t d = M.head_dim, bs = M.block_size, nkv = M.n_kv_heads;
    float m = -INFINITY, l = 0.f;
    float acc[512];
    float s[256];
    for (int64_t i = 0; i < d; i++) acc[i] = 0.f;
    for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t block = table[t0 / bs];
        const int64_t n = ctx - t0 < bs ? ctx - t0 : bs;
        float mb = m;
        for (int64_t j = 0; j < n; j++) {
            const int64_t off = ((block * bs + j) * nkv + kvh) * d;
            s[j] = dot_cache(q, L.k_cache, M.cache_kind, off, d) * M.attn_scale;
            if (s[j] > mb) mb = s[j];
        }
        const float corr = expf(m - mb);  // m = -inf on the first block: corr = 0
        l *= corr;
        for (int64_t i = 0; i < d; i++) acc[i] *= corr;
        for (int64_t j = 0; j < n; j++) {
            const float p = expf(s[j] - mb);
            l += p;
            axpy_cache(acc, p, L.v_cache, M.cache_kind, ((block * bs + j) * nkv + kvh) * d, d);
        }
        m = mb;
    }
    const float inv = 1.f / l;
    for (int64_t i = 0; i < d; i++) out[i] = acc[i] * inv;
}

#if defined(__AVX512F__)
static inline __m512 cache_vec(const void* c, int kind, int64_t off) {
    return kind == KIND_BF16
        ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)c + off))), 16))
        : _mm512_loadu_ps((const float*)c + off);
}

// attend() for HG query heads of one KV group at once, head_dim = 16 * DV: each K and V row is
// loaded (and widened from bf16) once for the HG heads, the HG scores of a key are reduced
// together (hsum4: 13 shuffles and adds for four dot products, where one reduction took ~8),
// and the softmax is updated once per chunk of up to 64 keys across blocks (the CPU block size
// is 8: per-block updates were a scalar exp and a rescale every 8 keys). The query and output
// accumulators live in registers within each loop.
template <int DV, int HG>
static void attend_group(const Model& M, const Layer& L, const float* q, int64_t kvh, const int64_t* table,
                         int64_t ctx, float* out) {
    static_assert(HG >= 1 && HG <= 4, "hsum4 reduces up to four heads");
    constexpr int64_t d = DV * 16;
    constexpr int KC = 64;
    const int64_t bs = M.block_size, nkv = M.n_kv_heads;
    const int bshift = __builtin_ctzll((unsigned long long)bs);
    const int kind = M.cache_kind;
    const void* kc = L.k_cache;
    const void* vc = L.v_cache;
    const int esz = kind == KIND_BF16 ? 2 : 4;
    const int64_t rowb = d * esz;
    auto kv_off = [&](int64_t t) { return (((table[t >> bshift] << bshift) + (t & (bs - 1))) * nkv + kvh) * d; };
    alignas(64) float accm[HG][d];
    alignas(64) float s[HG][KC];
    float m[HG], l[HG];
    for (int h = 0; h < HG; h++) {
        m[h] = -INFINITY;
        l[h] = 0.f;
        for (int64_t i = 0; i < d; i++) accm[h][i] = 0.f;
    }
    const __m128 scale4 = _mm_set1_ps(M.attn_scale);
    for (int64_t c0 = 0; c0 < ctx; c0 += KC) {
        const int64_t n = ctx - c0 < KC ? ctx - c0 : KC;
        {
            __m512 qv[HG][DV];
            for (int h = 0; h < HG; h++)
                for (int i = 0; i < DV; i++) qv[h][i] = _mm512_loadu_ps(q + h * d + 16 * i);
            for (int64_t j = 0; j < n; j++) {
                const int64_t t = c0 + j;
                const int64_t off = kv_off(t);
                kv_prefetch(vc, off, esz, rowb);  // this chunk's V rows, read after its softmax
                if (t + KPF < ctx) kv_prefetch(kc, kv_off(t + KPF), esz, rowb);
                __m512 kv[DV];
                for (int i = 0; i < DV; i++) kv[i] = cache_vec(kc, kind, off + 16 * i);
                __m512 a[4];
                for (int h = 0; h < 4; h++) a[h] = _mm512_setzero_ps();
                for (int h = 0; h < HG; h++) {
                    a[h] = _mm512_mul_ps(qv[h][0], kv[0]);
                    for (int i = 1; i < DV; i++) a[h] = _mm512_fmadd_ps(qv[h][i], kv[i], a[h]);
                }
                alignas(16) float r[4];
                _mm_store_ps(r, _mm_mul_ps(hsum4(a[0], a[1], a[2], a[3]), scale4));
                for (int h = 0; h < HG; h++) s[h][j] = r[h];
            }
        }
        const __mmask16 tail = (n & 15) ? (__mmask16)((1u << (n & 15)) - 1) : (__mmask16)0xffff;
        float corr[HG];
        for (int h = 0; h < HG; h++) {
            __m512 mx = _mm512_set1_ps(m[h]);
            for (int64_t j = 0; j < n; j += 16)
                mx = _mm512_mask_max_ps(mx, j + 16 <= n ? (__mmask16)0xffff : tail, mx, _mm512_loadu_ps(&s[h][j]));
            const float mb = _mm512_reduce_max_ps(mx);
            corr[h] = expf(m[h] - mb);  // m = -inf on the first chunk: corr = 0
            exp_shifted(s[h], n, mb);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j += 16)
                sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(j + 16 <= n ? (__mmask16)0xffff : tail, &s[h][j]));
            l[h] = l[h] * corr[h] + _mm512_reduce_add_ps(sum);
            m[h] = mb;
        }
        {
            __m512 acc[HG][DV];
            for (int h = 0; h < HG; h++) {
                const __m512 cv = _mm512_set1_ps(corr[h]);
                for (int i = 0; i < DV; i++) acc[h][i] = _mm512_mul_ps(_mm512_load_ps(&accm[h][16 * i]), cv);
            }
            for (int64_t j = 0; j < n; j++) {
                const int64_t t = c0 + j;
                const int64_t off = kv_off(t);
                __m512 vv[DV];
                for (int i = 0; i < DV; i++) vv[i] = cache_vec(vc, kind, off + 16 * i);
                for (int h = 0; h < HG; h++) {
                    const __m512 pv = _mm512_set1_ps(s[h][j]);
                    for (int i = 0; i < DV; i++) acc[h][i] = _mm512_fmadd_ps(pv, vv[i], acc[h][i]);
                }
            }
            for (int h = 0; h < HG; h++)
                for (int i = 0; i < DV; i++) _mm512_store_ps(&accm[h][16 * i], acc[h][i]);
        }
    }
    for (int h = 0; h < HG; h++) {
        const __m512 inv = _mm512_set1_ps(1.f / l[h]);
        for (int i = 0; i < DV; i++) _mm512_storeu_ps(out + h * d + 16 * i, _mm512_mul_ps(_mm512_load_ps(&accm[h][16 * i]), inv));
    }
}

// heads [0, nh) of one KV group, up to 16 / DV at a time (the register budget)
template <int DV>
static void attend_heads(const Model& M, const Layer& L, const float* q, int64_t kvh, const int64_t* table,
                         int64_t ctx, float* out, int64_t nh) {
    constexpr int64_t d = DV * 16;
    constexpr int MAXG = DV >= 16 ? 1 : (DV >= 8 ? 2 : 4);
    for (int64_t h = 0; h < nh;) {
        const int64_t g = nh - h < MAXG ? nh - h : MAXG;
        const float* qh = q + h * d;
        float* oh = out + h * d;
        if (g >= 4) attend_group<DV, (MAXG >= 4 ? 4 : 1)>(M, L, qh, kvh, table, ctx, oh);
        else if (g == 3) attend_group<DV, (MAXG >= 3 ? 3 : 1)>(M, L, qh, kvh, table, ctx, oh);
        else if (g == 2) attend_group<DV, (MAXG >= 2 ? 2 : 1)>(M, L, qh, kvh, table, ctx, oh);
        else attend_group<DV, 1>(M, L, qh, kvh, table, ctx, oh);
        h += g;
    }
}
#endif

#if defined(HAVE_AVX2_ONLY)
static inline __m256 cache_vec8(const void* c, int kind, int64_t off) {
    return kind == KIND_BF16 ? ld8((const uint16_t*)c + off) : _mm256_loadu_ps((const float*)c + off);
}

// attend() for the HG (<= 4) query heads of one KV group at once, head_dim = 8 * DV: the AVX2
// form of attend_group. Each K and V row is loaded (and widened) once for the HG heads; a
// score is two FMA chains per head (one chain of DV dependent FMAs was the step's bottleneck:
// ~40 cycles a key per head); the softmax is updated once per chunk of up to 64 keys with a
// vector exp; the output accumulates over the chunk in registers, 16 dimensions at a time.
template <int DV, int HG>
static void attend_group8(const Model& M, const Layer& L, const float* q, int64_t kvh, const int64_t* table,
                          int64_t ctx, float* out) {
    static_assert(HG >= 1 && HG <= 4 && DV % 2 == 0, "up to four heads, head_dim a multiple of 16");
    constexpr int64_t d = DV * 8;
    constexpr int KC = 64;
    const int64_t bs = M.block_size, nkv = M.n_kv_heads;
    const int kind = M.cache_kind;
    const int esz = kind == KIND_BF16 ? 2 : 4;
    const int64_t rowb = d * esz;
    auto kv_off = [&](int64_t t) { return ((table[t / bs] * bs + t % bs) * nkv + kvh) * d; };
    alignas(32) float accm[HG][d];
    alignas(32) float s[HG][KC];
    int64_t offs[KC];
    float m[HG], l[HG];
    for (int h = 0; h < HG; h++) {
        m[h] = -INFINITY;
        l[h] = 0.f;
        for (int64_t i = 0; i < d; i++) accm[h][i] = 0.f;
    }
    for (int64_t c0 = 0; c0 < ctx; c0 += KC) {
        const int64_t n = ctx - c0 < KC ? ctx - c0 : KC;
        for (int64_t j = 0; j < n; j++) {
            const int64_t t = c0 + j;
            offs[j] = kv_off(t);
        }
        for (int64_t j = 0; j < n; j++) {
            kv_prefetch(L.v_cache, offs[j], esz, rowb);  // this chunk's V rows, read after its softmax
            if (j + KPF < n) kv_prefetch(L.k_cache, offs[j + KPF], esz, rowb);
            else if (c0 + j + KPF < ctx) kv_prefetch(L.k_cache, kv_off(c0 + j + KPF), esz, rowb);
            __m256 a0[HG], a1[HG];
            for (int h = 0; h < HG; h++) a0[h] = a1[h] = _mm256_setzero_ps();
            for (int i = 0; i < DV; i += 2) {
                const __m256 k0 = cache_vec8(L.k_cache, kind, offs[j] + 8 * i);
                const __m256 k1 = cache_vec8(L.k_cache, kind, offs[j] + 8 * i + 8);
                for (int h = 0; h < HG; h++) {
                    a0[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + 8 * i), k0, a0[h]);
                    a1[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + 8 * i + 8), k1, a1[h]);
                }
            }
            for (int h = 0; h < HG; h++) s[h][j] = hsum8(_mm256_add_ps(a0[h], a1[h])) * M.attn_scale;
        }
        float corr[HG];
        for (int h = 0; h < HG; h++) {
            float mb = m[h];
            for (int64_t j = 0; j < n; j++) mb = s[h][j] > mb ? s[h][j] : mb;
            corr[h] = expf(m[h] - mb);  // m = -inf on the first chunk: corr = 0
            const __m256 mv = _mm256_set1_ps(mb);
            __m256 sum = _mm256_setzero_ps();
            int64_t j = 0;
            for (; j + 8 <= n; j += 8) {
                const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(&s[h][j]), mv));
                _mm256_storeu_ps(&s[h][j], e);
                sum = _mm256_add_ps(sum, e);
            }
            float tail = 0.f;
            for (; j < n; j++) tail += (s[h][j] = expf(s[h][j] - mb));
            l[h] = l[h] * corr[h] + hsum8(sum) + tail;
            m[h] = mb;
        }
        for (int i = 0; i < DV; i += 2) {
            __m256 acc0[HG], acc1[HG];
            for (int h = 0; h < HG; h++) {
                const __m256 cv = _mm256_set1_ps(corr[h]);
                acc0[h] = _mm256_mul_ps(_mm256_load_ps(&accm[h][8 * i]), cv);
                acc1[h] = _mm256_mul_ps(_mm256_load_ps(&accm[h][8 * i + 8]), cv);
            }
            for (int64_t j = 0; j < n; j++) {
                const __m256 v0 = cache_vec8(L.v_cache, kind, offs[j] + 8 * i);
                const __m256 v1 = cache_vec8(L.v_cache, kind, offs[j] + 8 * i + 8);
                for (int h = 0; h < HG; h++) {
                    const __m256 pv = _mm256_broadcast_ss(&s[h][j]);
                    acc0[h] = _mm256_fmadd_ps(pv, v0, acc0[h]);
                    acc1[h] = _mm256_fmadd_ps(pv, v1, acc1[h]);
                }
            }
            for (int h = 0; h < HG; h++) {
                _mm256_store_ps(&accm[h][8 * i], acc0[h]);
                _mm256_store_ps(&accm[h][8 * i + 8], acc1[h]);
            }
        }
    }
    for (int h = 0; h < HG; h++) {
        const __m256 inv = _mm256_set1_ps(1.f / l[h]);
        for (int i = 0; i < DV; i++) _mm256_storeu_ps(out + h * d + 8 * i, _mm256_mul_ps(_mm256_load_ps(&accm[h][8 * i]), inv));
    }
}

template <int DV>
static void attend_heads8(const Model& M, const Layer& L, const float* q, int64_t kvh, const int64_t* table,
                          int64_t ctx, float* out, int64_t nh) {
    constexpr int64_t d = DV * 8;
    for (int64_t h = 0; h < nh;) {
        const int64_t g = nh - h < 4 ? nh - h : 4;
        const float* qh = q + h * d;
        float* oh = out + h * d;
        if (g == 4) attend_group8<DV, 4>(M, L, qh, kvh, table, ctx, oh);
        else if (g == 3) attend_group8<DV, 3>(M, L, qh, kvh, table, ctx, oh);
        else if (g == 2) attend_group8<DV, 2>(M, L, qh, kvh, table, ctx, oh);
        else attend_group8<DV, 1>(M, L, qh, kvh, table, ctx, oh);
        h += g;
    }
}
#endif

// softmax(q K^T * scale) V for nh consecutive query heads (q and out head_dim apart) of KV head kvh
static void attend_any(const Model& M, const Layer& L, const float* q, int64_t kvh, const int64_t* table,
                       int64_t ctx, float* out, int64_t nh) {
#if defined(__AVX512F__)
    switch (M.head_dim) {
        case 64: return attend_heads<4>(M, L, q, kvh, table, ctx, out, nh);
        case 128: return attend_heads<8>(M, L, q, kvh, table, ctx, out, nh);
        case 256: return attend_heads<16>(M, L, q, kvh, table, ctx, out, nh);
        default: break;
    }
#elif defined(HAVE_AVX2_ONLY)
    switch (M.head_dim) {
        case 64: return attend_heads8<8>(M, L, q, kvh, table, ctx, out, nh);
        case 128: return attend_heads8<16>(M, L, q, kvh, table, ctx, out, nh);
        case 256: return attend_heads8<32>(M, L, q, kvh, table, ctx, out, nh);
        default: break;
    }
#endif
    for (int64_t h = 0; h < nh; h++) attend(M, L, q + h * M.head_dim, kvh, table, ctx, out + h * M.head_dim);
}

#if defined(__AVX512F__)
// Prompt rows attend in blocks: the nq <= 16 query vectors of a block (consecutive rows of one
// sequence x the query heads of KV head kvh) sit in the 16 lanes, transposed, so a key's scores
// for all of them are head_dim FMAs by the key's broadcast elements: no horizontal sums
// (attend_group spends ~13 shuffles a key on up to four heads) and each K and V row is widened
// once for the block. Query l (q[l], out[l]) attends to the first qctx[l] positions. Lanes past
// nq repeat query 0 and are dropped.
template <int DV>
static void attend_block(const Model& M, const Layer& L, const float* const* q, const int64_t* qctx, int nq,
                         int64_t kvh, const int64_t* table, float* const* out) {
    constexpr int64_t d = DV * 16;
    constexpr int KC = 16;                      // keys per chunk (one score vector each)
    constexpr int G = DV >= 16 ? 1 : 24 / DV;   // queries per pass of the P x V products
    const int64_t bs = M.block_size, nkv = M.n_kv_heads;
    const int bshift = __builtin_ctzll((unsigned long long)bs);
    const int kind = M.cache_kind;
    auto kv_off = [&](int64_t t) { return (((table[t >> bshift] << bshift) + (t & (bs - 1))) * nkv + kvh) * d; };
    alignas(64) float qt[d][16];
    alignas(64) float kf[KC][d], vf[KC][d], p[KC][16], accm[16][d];
    alignas(64) int32_t ctx32[16];
    alignas(64) float cr[16], lsum[16];
    int64_t cmax = 0;
    for (int l = 0; l < 16; l++) {
        const int src = l < nq ? l : 0;
        ctx32[l] = (int32_t)qctx[src];
        if (qctx[src] > cmax) cmax = qctx[src];
        for (int64_t i = 0; i < d; i++) qt[i][l] = q[src][i] * M.attn_scale;
    }
    for (int l = 0; l < nq; l++)
        for (int64_t i = 0; i < d; i++) accm[l][i] = 0.f;
    const __m512i ctxv = _mm512_load_si512(ctx32);
    __m512 m = _mm512_set1_ps(-INFINITY), lv = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < cmax; c0 += KC) {
        const int n = cmax - c0 < KC ? (int)(cmax - c0) : KC;
        for (int j = 0; j < n; j++) {
            const int64_t off = kv_off(c0 + j);
            for (int i = 0; i < DV; i++) {
                _mm512_store_ps(&kf[j][16 * i], cache_vec(L.k_cache, kind, off + 16 * i));
                _mm512_store_ps(&vf[j][16 * i], cache_vec(L.v_cache, kind, off + 16 * i));
            }
        }
        __m512 sc[KC];
        for (int j = 0; j < KC; j++) sc[j] = _mm512_setzero_ps();
        if (n == KC) {  // a whole chunk: sixteen independent sums, no per-key test in the loop
            for (int64_t i = 0; i < d; i++) {
                const __m512 qi = _mm512_load_ps(qt[i]);
                for (int j = 0; j < KC; j++) sc[j] = _mm512_fmadd_ps(qi, _mm512_set1_ps(kf[j][i]), sc[j]);
            }
        } else {
            for (int64_t i = 0; i < d; i++) {
                const __m512 qi = _mm512_load_ps(qt[i]);
                for (int j = 0; j < n; j++) sc[j] = _mm512_fmadd_ps(qi, _mm512_set1_ps(kf[j][i]), sc[j]);
            }
        }
        __m512 mx = m;
        __mmask16 valid[KC];
        for (int j = 0; j < n; j++) {
            valid[j] = _mm512_cmpgt_epi32_mask(ctxv, _mm512_set1_epi32((int32_t)(c0 + j)));
            mx = _mm512_mask_max_ps(mx, valid[j], mx, sc[j]);
        }
        const __m512 corr = exp16(_mm512_sub_ps(m, mx));  // m = -inf on the first chunk: ~0
        lv = _mm512_mul_ps(lv, corr);
        for (int j = 0; j < n; j++) {
            const __m512 pj = _mm512_maskz_mov_ps(valid[j], exp16(_mm512_sub_ps(sc[j], mx)));
            lv = _mm512_add_ps(lv, pj);
            _mm512_store_ps(p[j], pj);
        }
        m = mx;
        _mm512_store_ps(cr, corr);
        for (int q0 = 0; q0 < nq; q0 += G) {
            const int g = nq - q0 < G ? nq - q0 : G;
            __m512 acc[G][DV];
            for (int a = 0; a < G; a++)
                if (a < g) {
                    const __m512 cv = _mm512_set1_ps(cr[q0 + a]);
                    for (int i = 0; i < DV; i++) acc[a][i] = _mm512_mul_ps(_mm512_load_ps(&accm[q0 + a][16 * i]), cv);
                }
            for (int j = 0; j < n; j++) {
                __m512 vv[DV];
                for (int i = 0; i < DV; i++) vv[i] = _mm512_load_ps(&vf[j][16 * i]);
                for (int a = 0; a < G; a++)
                    if (a < g) {
                        const __m512 pv = _mm512_set1_ps(p[j][q0 + a]);
                        for (int i = 0; i < DV; i++) acc[a][i] = _mm512_fmadd_ps(pv, vv[i], acc[a][i]);
                    }
            }
            for (int a = 0; a < G; a++)
                if (a < g)
                    for (int i = 0; i < DV; i++) _mm512_store_ps(&accm[q0 + a][16 * i], acc[a][i]);
        }
    }
    _mm512_store_ps(lsum, lv);
    for (int l = 0; l < nq; l++) {
        const __m512 inv = _mm512_set1_ps(1.f / lsum[l]);
        for (int i = 0; i < DV; i++) _mm512_storeu_ps(out[l] + 16 * i, _mm512_mul_ps(_mm512_load_ps(&accm[l][16 * i]), inv));
    }
}
#endif

// Attention blocks of prompt rows (attend_block): the starts of runs of consecutive rows of one
// sequence whose contexts grow by one, at most 16 / rep rows each (16 query lanes over a KV group's
// rep heads; one row where the build or head_dim has no block kernel), then T
static std::vector<int64_t> prompt_blocks(const Model& M, int64_t rep, int64_t T, const int64_t* row_seq,
                                          const int64_t* ctx) {
    int64_t R = 1;
#if defined(__AVX512F__)
    if ((M.head_dim == 64 || M.head_dim == 128 || M.head_dim == 256) && rep <= 8) R = 16 / rep;
#endif
    std::vector<int64_t> blk;
    for (int64_t t = 0; t < T; t++)
        if (t == 0 || row_seq[t] != row_seq[t - 1] || ctx[t] != ctx[t - 1] + 1 || t - blk.back() == R)
            blk.push_back(t);
    blk.push_back(T);
    return blk;
}

static void attend_block_any(const Model& M, const Layer& L, const float* const* q, const int64_t* qctx, int nq,
                             int64_t kvh, const int64_t* table, float* const* out) {
#if defined(__AVX512F__)
    switch (M.head_dim) {
        case 64: return attend_block<4>(M, L, q, qctx, nq, kvh, table, out);
        case 128: return attend_block<8>(M, L, q, qctx, nq, kvh, table, out);
        case 256: return attend_block<16>(M, L, q, qctx, nq, kvh, table, out);
        default: break;
    }
#endif
    for (int l = 0; l < nq; l++) attend_any(M, L, q[l], kvh, table, qctx[l], out[l], 1);
}


// ------------------------------------------------------------------ the step

// Work buffers (float32 unless noted), sized by the caller for B rows and T threads:
//   x [B, hidden] residual stream; qkv [B, (H + 2 KVH) D]; att [B, H D] + att_h (bf16);
//   act [B, inter] + act_h (bf16); per thread: h [T, B, hidden] + hh (bf16) normed input,
//   scratch [T, B, 128]
struct Work {
    float *x, *qkv, *att, *act, *h, *scratch;
    uint16_t *att_h, *act_h, *hh;
};

// Few rows: each thread normalises every row into its own buffer, cheaper than a barrier. Many
// (prompt rows): the rows split over the threads into thread 0's buffer (the omp for's barrier
// publishes them; every reader of the previous contents has passed a barrier since).
constexpr int64_t NORM_SPLIT_ROWS = 16;
static Act norm_rows(const Model& M, const float* x, const float* w, int64_t B, const Work* W, int tid, int rnd) {
    const int64_t H = M.hidden;
    if (B >= NORM_SPLIT_ROWS) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) rmsnorm_row(x + b * H, w, H, M.eps, rnd, W->h + b * H, W->hh + b * H);
        return Act{W->h, W->hh, H};
    }
    float* h = W->h + (int64_t)tid * B * H;
    uint16_t* hh = W->hh + (int64_t)tid * B * H;
    for (int64_t b = 0; b < B; b++) rmsnorm_row(x + b * H, w, H, M.eps, rnd, h + b * H, hh + b * H);
    return Act{h, hh, H};
}

// One task per (row, KV head), in two halves: RoPE + K/V write for the head (write_kv), then its
// group of query heads attends over the row's sequence (attend_rows). A decode step runs both in
// one task: a decode row only reads its own sequence's slots, and the slot it writes is in a block
// no other row writes (a shared prefix block is copied before it is written). Rows of one prompt
// read each other's slots, so a step with prompt rows writes every row's K/V first (a barrier).
static void write_kv(const Model& M, const Layer& L, int64_t b, int64_t g, const int64_t* pos,
                     const int64_t* slots, const Work* W, int rnd) {
    const int64_t D = M.head_dim, NH = M.n_heads, NKV = M.n_kv_heads, QKV = (NH + 2 * NKV) * D;
    float* k = W->qkv + b * QKV + NH * D + g * D;
    float* v = W->qkv + b * QKV + (NH + NKV) * D + g * D;
    if (L.k_norm) rmsnorm_row(k, L.k_norm, D, M.eps, rnd, k, nullptr);
    rope(k, M.rope_cos + pos[b] * D, M.rope_sin + pos[b] * D, D, rnd);
    const int64_t base = (slots[b] * NKV + g) * D;
    for (int64_t i = 0; i < D; i++) {
        if (M.cache_kind == KIND_BF16) {
            ((uint16_t*)L.k_cache)[base + i] = f32_to_bf16(k[i]);
            ((uint16_t*)L.v_cache)[base + i] = f32_to_bf16(v[i]);
        } else {
            ((float*)L.k_cache)[base + i] = k[i];
            ((float*)L.v_cache)[base + i] = v[i];
        }
    }
}

// row b's attention output of KV head g's query heads: rounded where bf16 rounds, and its bf16 copy
static void att_out(const Model& M, int64_t b, int64_t g, const Work* W, int rnd) {
    const int64_t D = M.head_dim, NH = M.n_heads, rep = NH / M.n_kv_heads;
    float* o = W->att + b * NH * D + g * rep * D;
    uint16_t* oh = W->att_h + b * NH * D + g * rep * D;
    for (int64_t i = 0; i < rep * D; i++) {
        if (rnd) o[i] = round_bf16(o[i]);
        oh[i] = f32_to_bf16(o[i]);
    }
}

static void attend_rows(const Model& M, const Layer& L, int64_t b, int64_t g, const int64_t* pos,
                        const int64_t* table, int64_t ctx, const Work* W, int rnd) {
    const int64_t D = M.head_dim, NH = M.n_heads, NKV = M.n_kv_heads, QKV = (NH + 2 * NKV) * D;
    const int64_t rep = NH / NKV;
    float* q = W->qkv + b * QKV;
    for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
        float* qh = q + h * D;
        if (L.q_norm) rmsnorm_row(qh, L.q_norm, D, M.eps, rnd, qh, nullptr);
        rope(qh, M.rope_cos + pos[b] * D, M.rope_sin + pos[b] * D, D, rnd);
    }
    attend_any(M, L, q + g * rep * D, g, table, ctx, W->att + b * NH * D + g * rep * D, rep);
    att_out(M, b, g, W, rnd);
}

// Rows [b0, b1) of one sequence (a prompt_blocks block) for KV head g: their query heads in one
// attend_block, or attend_rows for a single row.
static void attend_block_rows(const Model& M, const Layer& L, int64_t b0, int64_t b1, int64_t g, const int64_t* pos,
                              const int64_t* table, const int64_t* ctx_lens, const Work* W, int rnd) {
    if (b1 - b0 == 1) return attend_rows(M, L, b0, g, pos, table, ctx_lens[b0], W, rnd);
    const int64_t D = M.head_dim, NH = M.n_heads, NKV = M.n_kv_heads, QKV = (NH + 2 * NKV) * D;
    const int64_t rep = NH / NKV;
    const float* qs[16];
    float* os[16];
    int64_t qc[16];
    int nq = 0;
    for (int64_t b = b0; b < b1; b++)
        for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
            float* qh = W->qkv + b * QKV + h * D;
            if (L.q_norm) rmsnorm_row(qh, L.q_norm, D, M.eps, rnd, qh, nullptr);
            rope(qh, M.rope_cos + pos[b] * D, M.rope_sin + pos[b] * D, D, rnd);
            qs[nq] = qh;
            os[nq] = W->att + b * NH * D + h * D;
            qc[nq++] = ctx_lens[b];
        }
    attend_block_any(M, L, qs, qc, nq, g, table, os);
    for (int64_t b = b0; b < b1; b++) att_out(M, b, g, W, rnd);
}

// Every layer for B rows, then the logits of the rows asked for. Row b is token ids[b] at position
// pos[b], its K/V written to slots[b]; it attends to the first ctx_lens[b] positions of the block
// table tables + seq(b) * table_width, seq(b) = row_seq ? row_seq[b] : b (one table per row for a
// decode step; rows of one prompt share their sequence's). logits [n_out, vocab] for rows
// out_rows[0..n_out) (increasing), or for every row when out_rows is null.
static int forward_rows(const Model& M, int64_t B, const int64_t* ids, const int64_t* pos, const int64_t* slots,
                        const int64_t* tables, int64_t table_width, int64_t n_tables, const int64_t* row_seq,
                        const int64_t* ctx_lens, int64_t n_out, const int64_t* out_rows, const Work* W,
                        float* logits, int32_t threads) {
    const int64_t H = M.hidden, D = M.head_dim, NH = M.n_heads, NKV = M.n_kv_heads, I = M.inter;
    const int64_t QKV = (NH + 2 * NKV) * D;
    if (D > 512 || M.block_size > 256 || (D & 1) || NH % NKV) return -1;
    for (int64_t b = 0; b < B; b++) {
        if (ids[b] < 0 || ids[b] >= M.vocab) return -2;
        if (pos[b] < 0 || pos[b] >= M.max_pos) return -3;
        if (ctx_lens[b] < 1 || ctx_lens[b] > table_width * M.block_size) return -4;
        if (row_seq && (row_seq[b] < 0 || row_seq[b] >= n_tables)) return -5;
    }
    if (out_rows) {
        if (n_out < 0 || n_out > B) return -6;
        for (int64_t i = 0; i < n_out; i++)
            if (out_rows[i] < i || out_rows[i] >= B || (i && out_rows[i] <= out_rows[i - 1])) return -6;
    } else {
        n_out = B;
    }
    const int rnd = M.round_bf16;
    float* x = W->x;
    const Act att = {W->att, W->att_h, NH * D};
    const Act act = {W->act, W->act_h, I};
    auto table = [&](int64_t b) { return tables + (row_seq ? row_seq[b] : b) * table_width; };
    // with prompt rows, attention goes by blocks of consecutive rows (attend_block_rows)
    const std::vector<int64_t> blk =
        row_seq ? prompt_blocks(M, NH / NKV, B, row_seq, ctx_lens) : std::vector<int64_t>{};
    const int64_t nblk = row_seq ? (int64_t)blk.size() - 1 : 0;
    // five barriers per layer (six with prompt rows): after the qkv product, (the K/V writes,) the
    // attention, the o product, the gate/up product and the down product (each `omp for` ends in one)
#pragma omp parallel num_threads(threads)
    {
        // embedding rows -> residual stream
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            for (int64_t i = 0; i < H; i++) {
                float v;
                int64_t at = ids[b] * H + i;
                if (M.embed_packed) {  // row r, column i of [n/16][H/g][16][g] panels
                    const int64_t g = M.embed_kind == KIND_I8 ? 4 : M.embed_kind == KIND_BF16 ? 2 : 1, r = ids[b];
                    at = ((r / 16) * (H / g) + i / g) * 16 * g + (r % 16) * g + i % g;
                }
                if (M.embed_kind == KIND_BF16) v = bf16_to_f32(((const uint16_t*)M.embed)[at]);
                else if (M.embed_kind == KIND_I8) {
                    v = (float)((const int8_t*)M.embed)[at] * M.embed_scale[ids[b]];
                    if (rnd) v = round_bf16(v);
                } else v = ((const float*)M.embed)[at];
                x[b * H + i] = v;
            }
        }
        const int tid = omp_get_thread_num();
        float* scratch = W->scratch + (int64_t)tid * B * 128;
        for (int64_t li = 0; li < M.n_layers; li++) {
            const Layer& L = M.layers[li];
            Act hin = norm_rows(M, x, L.in_norm, B, W, tid, rnd);
            linear_par(L.qkv, hin, B, W->qkv, QKV, OUT_STORE, rnd);
            if (row_seq) {
#pragma omp for schedule(static)
                for (int64_t t = 0; t < B * NKV; t++) write_kv(M, L, t / NKV, t % NKV, pos, slots, W, rnd);
#pragma omp for schedule(dynamic, 1)
                for (int64_t t = 0; t < nblk * NKV; t++) {
                    const int64_t b0 = blk[t / NKV];
                    attend_block_rows(M, L, b0, blk[t / NKV + 1], t % NKV, pos, table(b0), ctx_lens, W, rnd);
                }
            } else {
#pragma omp for schedule(dynamic, 1)
                for (int64_t t = 0; t < B * NKV; t++) {
                    write_kv(M, L, t / NKV, t % NKV, pos, slots, W, rnd);
                    attend_rows(M, L, t / NKV, t % NKV, pos, table(t / NKV), ctx_lens[t / NKV], W, rnd);
                }
            }
            linear_par(L.o, att, B, x, H, OUT_ADD, rnd);
            hin = norm_rows(M, x, L.post_norm, B, W, tid, rnd);
            gate_up_par(L.gate_up, hin, B, scratch, W->act, W->act_h, rnd);
            linear_par(L.down, act, B, x, H, OUT_ADD, rnd);
        }
        if (out_rows) {  // the rows asked for, to the front (out_rows[i] >= i: nothing is overwritten unread)
#pragma omp single
            for (int64_t i = 0; i < n_out; i++)
                if (out_rows[i] != i) memcpy(x + i * H, x + out_rows[i] * H, H * sizeof(float));
        }
        Act hin = norm_rows(M, x, M.final_norm, n_out, W, tid, rnd);
        linear_par(M.lm_head, hin, n_out, logits, M.vocab, OUT_STORE, 0);
    }
    return 0;
}

// Returns 0, or a negative code for an argument the step cannot take.
extern "C" int llmcore_decode_step(const Model* Mp, int64_t B, const int64_t* ids, const int64_t* pos,
                                   const int64_t* slots, const int64_t* tables, int64_t table_width,
                                   const int64_t* ctx_lens, const Work* W, float* logits, int32_t threads) {
    return forward_rows(*Mp, B, ids, pos, slots, tables, table_width, B, nullptr, ctx_lens, B, nullptr, W, logits,
                        threads);
}

// A step with prompt rows (prefill chunks, mixed with decode rows): forward_rows with the rows of
// each sequence sharing its block table (row_seq) and logits for out_rows only. The rows of a
// sequence are in position order, and a row attends to ctx_lens[b] = pos[b] + 1 positions (causal).
extern "C" int llmcore_forward_rows(const Model* Mp, int64_t B, const int64_t* ids, const int64_t* pos,
                                    const int64_t* slots, const int64_t* tables, int64_t table_width,
                                    int64_t n_tables, const int64_t* row_seq, const int64_t* ctx_lens,
                                    int64_t n_out, const int64_t* out_rows, const Work* W, float* logits,
                                    int32_t threads) {
    if (!row_seq || !out_rows) return -6;
    return forward_rows(*Mp, B, ids, pos, slots, tables, table_width, n_tables, row_seq, ctx_lens, n_out, out_rows,
                        W, logits, threads);
}

// For the build check and tests: which kernels this build has.
extern "C" int llmcore_native_features(void) {
    int f = 0;
#if defined(__AVX512F__)
    f |= 1;
#endif
#if defined(__AVX512BF16__)
    f |= 2;
#endif
#ifdef HAVE_I16_DOT
    f |= 4;
#endif
#if defined(HAVE_AVX2_ONLY)
    f |= 8;
#endif
    return f;
}

// Batch rows up to which 4-bit products take int8 activations (Q4_INT_ROWS), for tests and docs.
extern "C" int llmcore_q4_integer_rows(void) { return (int)Q4_INT_ROWS; }

// For the layout test: every field of the structs the ctypes Structures mirror, one line each,
// "struct field offset size", then "struct - sizeof size". A field added, moved or retyped on
// one side only fails tests/cpu/test_native_layout.py instead of reading the wrong bytes.
#define LAYOUT_FIELD(S, f) \
    out += #S " " #f " " + std::to_string(offsetof(S, f)) + " " + std::to_string(sizeof(((S*)nullptr)->f)) + "\n"
#define LAYOUT_SIZE(S) out += #S " - " + std::to_string(sizeof(S)) + "\n"
extern "C" const char* llmcore_struct_layout(void) {
    static const std::string layout = [] {
        std::string out;
        LAYOUT_FIELD(Linear, w); LAYOUT_FIELD(Linear, scale); LAYOUT_FIELD(Linear, bias);
        LAYOUT_FIELD(Linear, rowsum); LAYOUT_FIELD(Linear, n); LAYOUT_FIELD(Linear, k);
        LAYOUT_FIELD(Linear, kind); LAYOUT_FIELD(Linear, packed);
        LAYOUT_FIELD(Linear, groups); LAYOUT_FIELD(Linear, group); LAYOUT_FIELD(Linear, group_kind);
        LAYOUT_FIELD(Linear, bsum);
        LAYOUT_SIZE(Linear);
        LAYOUT_FIELD(Layer, qkv); LAYOUT_FIELD(Layer, o); LAYOUT_FIELD(Layer, gate_up); LAYOUT_FIELD(Layer, down);
        LAYOUT_FIELD(Layer, in_norm); LAYOUT_FIELD(Layer, post_norm); LAYOUT_FIELD(Layer, q_norm);
        LAYOUT_FIELD(Layer, k_norm); LAYOUT_FIELD(Layer, k_cache); LAYOUT_FIELD(Layer, v_cache); LAYOUT_SIZE(Layer);
        LAYOUT_FIELD(Model, hidden); LAYOUT_FIELD(Model, n_heads); LAYOUT_FIELD(Model, n_kv_heads);
        LAYOUT_FIELD(Model, head_dim); LAYOUT_FIELD(Model, inter); LAYOUT_FIELD(Model, vocab);
        LAYOUT_FIELD(Model, n_layers); LAYOUT_FIELD(Model, block_size); LAYOUT_FIELD(Model, max_pos);
        LAYOUT_FIELD(Model, eps); LAYOUT_FIELD(Model, attn_scale); LAYOUT_FIELD(Model, cache_kind);
        LAYOUT_FIELD(Model, round_bf16); LAYOUT_FIELD(Model, embed); LAYOUT_FIELD(Model, embed_scale);
        LAYOUT_FIELD(Model, embed_kind); LAYOUT_FIELD(Model, embed_packed); LAYOUT_FIELD(Model, final_norm);
        LAYOUT_FIELD(Model, lm_head); LAYOUT_FIELD(Model, rope_cos); LAYOUT_FIELD(Model, rope_sin);
        LAYOUT_FIELD(Model, layers); LAYOUT_SIZE(Model);
        LAYOUT_FIELD(Work, x); LAYOUT_FIELD(Work, qkv); LAYOUT_FIELD(Work, att); LAYOUT_FIELD(Work, act);
        LAYOUT_FIELD(Work, h); LAYOUT_FIELD(Work, scratch); LAYOUT_FIELD(Work, att_h); LAYOUT_FIELD(Work, act_h);
        LAYOUT_FIELD(Work, hh); LAYOUT_SIZE(Work);
        return out;
    }();
    return layout.c_str();
}

// y = x W^T (+ bias) for tests of the tiled products alone.
extern "C" int llmcore_linear(const Linear* L, int64_t B, const float* xf, const uint16_t* xh, float* y, int32_t threads) {
    Act a = {xf, xh, L->k};
#pragma omp parallel num_threads(threads)
    linear_par(*L, a, B, y, L->n, OUT_STORE, 0);
    return 0;
}

// softmax(q K^T * scale) V for nh query heads of KV head kvh over ctx positions of the paged
// cache (M: head_dim, n_kv_heads, block_size, cache_kind, attn_scale; L: k_cache, v_cache), for
// tests of the attention kernels alone.
extern "C" int llmcore_attention(const Model* M, const Layer* L, const float* q, int64_t kvh, const int64_t* table,
                                 int64_t ctx, float* out, int64_t nh) {
    if (M->head_dim > 512 || M->block_size > 256 || ctx < 1 || kvh < 0 || kvh >= M->n_kv_heads) return -1;
    attend_any(*M, *L, q, kvh, table, ctx, out, nh);
    return 0;
}

// Attention of the prompt rows of a prefill (or mixed) step, after their K/V are in the cache: row
// t (query heads nh, q and out [T, nh, head_dim] float32) attends to the first row_ctx[t] positions
// of sequence row_seq[t] (its block table: tables + row_seq[t] * table_width), causal by
// construction. One task per (prompt_blocks block, KV head), as in forward_rows: attend_block for a
// run of a prompt's rows, the decode kernels' attend_any for a lone row; a prompt's K/V rows stay
// in L2 while its rows are computed. Same checks as the decode step.
extern "C" int llmcore_prefill_attention(const Model* M, const Layer* L, const float* q, int64_t T, int64_t nh,
                                         const int64_t* tables, int64_t table_width, const int64_t* row_seq,
                                         const int64_t* row_ctx, float* out, int32_t threads) {
    const int64_t NKV = M->n_kv_heads, D = M->head_dim;
    if (D > 512 || (D & 1) || M->block_size > 256 || NKV < 1 || nh % NKV) return -1;
    for (int64_t t = 0; t < T; t++)
        if (row_ctx[t] < 1 || row_ctx[t] > table_width * M->block_size) return -4;
    const int64_t rep = nh / NKV;
    const std::vector<int64_t> blk = prompt_blocks(*M, rep, T, row_seq, row_ctx);  // as forward_rows
    const int64_t nblk = (int64_t)blk.size() - 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t task = 0; task < nblk * NKV; task++) {
        const int64_t t0 = blk[task / NKV], t1 = blk[task / NKV + 1], g = task % NKV;
        const int64_t* table = tables + row_seq[t0] * table_width;
        if (t1 - t0 == 1) {
            attend_any(*M, *L, q + (t0 * nh + g * rep) * D, g, table, row_ctx[t0], out + (t0 * nh + g * rep) * D, rep);
            continue;
        }
        const float* qs[16];
        float* os[16];
        int64_t qc[16];
        int nq = 0;
        for (int64_t t = t0; t < t1; t++)
            for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
                qs[nq] = q + (t * nh + h) * D;
                os[nq] = out + (t * nh + h) * D;
                qc[nq++] = row_ctx[t];
            }
        attend_block_any(*M, *L, qs, qc, nq, g, table, os);
    }
    return 0;
}
