/* softmax(q·kᵀ·scale)·v for bf16 multi-head attention on AVX512-BF16 CPUs, one pass over the keys per block of
   query rows (flash attention): scores never leave the L1 cache, and both products are bf16 dot products
   (vdpbf16ps, fp32 sums) — no product of the whole score matrix, no second pass over it.

   Per (image, head), `pack` lays out the keys and values once for the products:
     kp[key block of 16][pair of widths][16 keys]: two bf16 of a key (widths 2p, 2p+1) per 32-bit lane;
     vp[pair of keys][width block of 16][16 widths]: the same width of two keys per 32-bit lane.
   Then `attend`, per ROWS query rows and CHUNK keys at a time:
     1. scores s = q·kᵀ (ROWS × 32 keys of fp32 sums in registers, over the width's pairs), and their maximum;
     2. softmax numerators p = 2^((s − max)·scale·log2 e) (fp32 → bf16), their sum, and the running output and sum
        rescaled for the new maximum (the online softmax);
     3. o += p·v (ROWS × up to 3 width blocks in registers, over the chunk's pairs of keys).
   At the end each output row is o / sum, rounded to bf16. Keys are padded to a multiple of 32 with zeros, masked
   out of the maximum and of p. */
#include "bf16_vector.h"

#define ROWS 8          /* query rows per register tile */
#define CHUNK 512       /* keys per online-softmax step: ROWS × CHUNK scores (16 KiB) stay in L1 */
#define MAX_BLOCKS 16   /* widths up to 256 */

/* keys and values of every (image, head): (images, tokens, heads · width) rows `stride` elements apart, padded to
   `padded` keys; kp and vp hold each (image, head) in turn */
void pack(const bf16 *k, const bf16 *v, long images, long heads, long stride, long tokens, long padded, long width,
          uint32_t *kp, uint32_t *vp, int threads) {
  long pairs = width / 2, blocks = (width + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long image_head = 0; image_head < images * heads; image_head++) {
    long offset = image_head / heads * tokens * stride + image_head % heads * width;
    uint32_t *keys = kp + image_head * padded * pairs, *values = vp + image_head * padded / 2 * blocks * 16;
    for (long t = 0; t < padded; t++) {
      uint32_t *key = keys + t / 16 * pairs * 16 + t % 16;
      for (long p = 0; p < pairs; p++) key[p * 16] = t < tokens ? pair_at(k + offset + t * stride + 2 * p) : 0;
    }
    for (long t = 0; t < padded; t += 2) {
      uint32_t *value = values + t / 2 * blocks * 16;
      const bf16 *first = v + offset + t * stride, *second = first + stride;
      if (t + 1 < tokens)
        for (long d = 0; d < width; d++) value[d] = first[d] | (uint32_t)second[d] << 16;
      else
        for (long d = 0; d < width; d++) value[d] = t < tokens ? first[d] : 0;
      memset(value + width, 0, (blocks * 16 - width) * sizeof *value);
    }
  }
}

static inline __mmask16 first_lanes(long n) {
  return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

/* s[r][j .. j + 32) = q_r · k for 32 keys from key block kb, best[r] = max(best[r], those scores); with
   `masked`, only the first `valid` keys count for the maximum (the rest are padding, score 0) */
static inline __attribute__((always_inline)) void score_tile(const bf16 *const *q, const uint32_t *kp, long pairs,
                                                             long kb, long j, float *s, __m512 *best,
                                                             const int masked, long valid) {
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint32_t *k0 = kp + kb * pairs * 16, *k1 = k0 + pairs * 16;
  for (long p = 0; p < pairs; p++) {
    __m512bh a = (__m512bh)_mm512_loadu_si512(k0 + p * 16), b = (__m512bh)_mm512_loadu_si512(k1 + p * 16);
    for (int r = 0; r < ROWS; r++) {
      __m512bh x = (__m512bh)_mm512_set1_epi32((int)pair_at(q[r] + 2 * p));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, a);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b);
    }
  }
  for (int r = 0; r < ROWS; r++) {
    _mm512_storeu_ps(s + r * CHUNK + j, acc[r][0]);
    _mm512_storeu_ps(s + r * CHUNK + j + 16, acc[r][1]);
    if (masked) {
      acc[r][0] = _mm512_mask_blend_ps(first_lanes(valid - j), _mm512_set1_ps(-1e30f), acc[r][0]);
      acc[r][1] = _mm512_mask_blend_ps(first_lanes(valid - j - 16), _mm512_set1_ps(-1e30f), acc[r][1]);
    }
    best[r] = _mm512_max_ps(best[r], _mm512_max_ps(acc[r][0], acc[r][1]));
  }
}

/* s[r][j] = q_r · k_j for the chunk's `count` keys from key block kb0 (of which `valid` are real keys), and
   top[r] = the largest real score of row r */
static inline __attribute__((always_inline)) void scores(const bf16 *const *q, const uint32_t *kp, long pairs,
                                                         long kb0, long count, long valid, float *s, float *top) {
  __m512 best[ROWS];
  for (int r = 0; r < ROWS; r++) best[r] = _mm512_set1_ps(-1e30f);
  long j = 0;
  for (; j < count && j + 32 <= valid; j += 32) score_tile(q, kp, pairs, kb0 + j / 16, j, s, best, 0, valid);
  for (; j < count; j += 32) score_tile(q, kp, pairs, kb0 + j / 16, j, s, best, 1, valid);
  for (int r = 0; r < ROWS; r++) top[r] = _mm512_reduce_max_ps(best[r]);
}

/* o[r][width blocks b0 .. b0 + G) += Σ p[r][j]·v_j over the chunk's `pairs` pairs of keys; with `half`, also
   the first 8 widths of block b0 + G (a width of 8 mod 16: 256-bit products cost half on CPUs that split 512) */
static inline __attribute__((always_inline)) void weighted(const bf16 *p, const uint32_t *vp, long blocks,
                                                           long pairs, float *o, long b0, const int G,
                                                           const int half) {
  __m512 acc[ROWS][3];
  __m256 tail[ROWS];
  for (int r = 0; r < ROWS; r++) {
    for (int g = 0; g < G; g++) acc[r][g] = _mm512_loadu_ps(o + r * MAX_BLOCKS * 16 + (b0 + g) * 16);
    if (half) tail[r] = _mm256_loadu_ps(o + r * MAX_BLOCKS * 16 + (b0 + G) * 16);
  }
  for (long t = 0; t < pairs; t++) {
    __m512bh w[3];
    __m256bh w_tail;
    for (int g = 0; g < G; g++) w[g] = (__m512bh)_mm512_loadu_si512(vp + (t * blocks + b0 + g) * 16);
    if (half) w_tail = (__m256bh)_mm256_loadu_si256((const __m256i *)(vp + (t * blocks + b0 + G) * 16));
    for (int r = 0; r < ROWS; r++) {
      uint32_t pair = pair_at(p + r * CHUNK + 2 * t);
      __m512bh x = (__m512bh)_mm512_set1_epi32((int)pair);
      for (int g = 0; g < G; g++) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], x, w[g]);
      if (half) tail[r] = _mm256_dpbf16_ps(tail[r], (__m256bh)_mm256_set1_epi32((int)pair), w_tail);
    }
  }
  for (int r = 0; r < ROWS; r++) {
    for (int g = 0; g < G; g++) _mm512_storeu_ps(o + r * MAX_BLOCKS * 16 + (b0 + g) * 16, acc[r][g]);
    if (half) _mm256_storeu_ps(o + r * MAX_BLOCKS * 16 + (b0 + G) * 16, tail[r]);
  }
}

/* every task, on `threads` threads: task = ((image · heads + head) · row tasks + i), the query rows [i ·
   task_rows, (i + 1) · task_rows) of that image and head. q, out: (images, tokens_q, heads · width), rows
   `stride` / `out_stride` elements apart; kp, vp: `pack`'s output for each (image, head) in that order, keys
   padded to `padded`. */
void attend(const bf16 *q, long stride, const uint32_t *kp_all, const uint32_t *vp_all, bf16 *out, long out_stride,
            long images, long heads, long tokens_q, long tokens_k, long padded, long width, float scale,
            long task_rows, int threads) {
  long pairs = width / 2, blocks = (width + 15) / 16, row_tasks = (tokens_q + task_rows - 1) / task_rows;
  float factor = scale * 1.4426950408889634f;   /* e^x = 2^(x·log2 e) */
#pragma omp parallel num_threads(threads)
  {
  float s[ROWS * CHUNK] __attribute__((aligned(64)));
  bf16 p[ROWS * CHUNK] __attribute__((aligned(64)));
  float o[ROWS * MAX_BLOCKS * 16] __attribute__((aligned(64)));
#pragma omp for schedule(static)
  for (long task = 0; task < images * heads * row_tasks; task++) {
    long image_head = task / row_tasks, image = image_head / heads, head = image_head % heads;
    const uint32_t *kp = kp_all + image_head * padded * pairs, *vp = vp_all + image_head * padded / 2 * blocks * 16;
    long first = task % row_tasks * task_rows, last = first + task_rows < tokens_q ? first + task_rows : tokens_q;
    for (long r0 = first; r0 < last; r0 += ROWS) {
      const bf16 *rows[ROWS];   /* past the last row: the last row again, computed and not stored */
      float running_max[ROWS], sum[ROWS];
      for (int r = 0; r < ROWS; r++) {
        rows[r] = q + (image * tokens_q + (r0 + r < last ? r0 + r : last - 1)) * stride + head * width;
        running_max[r] = -1e30f;
        sum[r] = 0.f;
        memset(o + r * MAX_BLOCKS * 16, 0, blocks * 16 * sizeof(float));
      }
      for (long c = 0; c < padded; c += CHUNK) {
        long count = padded - c < CHUNK ? padded - c : CHUNK, valid = tokens_k - c;
        float top[ROWS];
        scores(rows, kp, pairs, c / 16, count, valid, s, top);
        for (int r = 0; r < ROWS; r++) {
          float largest = top[r] * factor > running_max[r] ? top[r] * factor : running_max[r];
          __m512 shift = _mm512_set1_ps(-largest), factors = _mm512_set1_ps(factor), total = _mm512_setzero_ps();
          for (long j = 0; j < count; j += 32) {
            __m512 e0 = exp2_ps(_mm512_fmadd_ps(_mm512_loadu_ps(s + r * CHUNK + j), factors, shift));
            __m512 e1 = exp2_ps(_mm512_fmadd_ps(_mm512_loadu_ps(s + r * CHUNK + j + 16), factors, shift));
            if (j + 32 > valid) {
              e0 = _mm512_maskz_mov_ps(first_lanes(valid - j), e0);
              e1 = _mm512_maskz_mov_ps(first_lanes(valid - j - 16), e1);
            }
            total = _mm512_add_ps(total, _mm512_add_ps(e0, e1));
            _mm512_storeu_si512(p + r * CHUNK + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
          }
          float rescale = exp2_ps(_mm512_set1_ps(running_max[r] - largest))[0];
          sum[r] = sum[r] * rescale + _mm512_reduce_add_ps(total);
          running_max[r] = largest;
          if (rescale != 1.f)
            for (long d = 0; d < blocks * 16; d += 16) {
              float *od = o + r * MAX_BLOCKS * 16 + d;
              _mm512_storeu_ps(od, _mm512_mul_ps(_mm512_loadu_ps(od), _mm512_set1_ps(rescale)));
            }
        }
        const uint32_t *vc = vp + c / 2 * blocks * 16;
        long b = 0, full = width / 16;   /* full blocks of 16 widths, then 8 or 16 more where width % 16 */
        for (; b + 3 <= full; b += 3) weighted(p, vc, blocks, count / 2, o, b, 3, 0);
        if (width % 16 == 0 || width % 16 > 8) {
          if (blocks - b == 3) weighted(p, vc, blocks, count / 2, o, b, 3, 0);
          if (blocks - b == 2) weighted(p, vc, blocks, count / 2, o, b, 2, 0);
          if (blocks - b == 1) weighted(p, vc, blocks, count / 2, o, b, 1, 0);
        } else {
          if (full - b == 2) weighted(p, vc, blocks, count / 2, o, b, 2, 1);
          if (full - b == 1) weighted(p, vc, blocks, count / 2, o, b, 1, 1);
          if (full - b == 0) weighted(p, vc, blocks, count / 2, o, b, 0, 1);
        }
      }
      for (int r = 0; r < ROWS && r0 + r < last; r++) {
        bf16 *dst = out + (image * tokens_q + r0 + r) * out_stride + head * width;
        __m512 inverse = _mm512_set1_ps(1.f / sum[r]);
        for (long d = 0; d < width; d += 16) {
          __m512 x = _mm512_mul_ps(_mm512_loadu_ps(o + r * MAX_BLOCKS * 16 + d), inverse);
          _mm256_mask_storeu_epi16(dst + d, first_lanes(width - d), (__m256i)_mm512_cvtneps_pbh(x));
        }
      }
    }
  }
  }
}
