/* GEGLU of the bf16 CPU fast path on AVX512-BF16, one pass: y = (x·vᵀ + bv) · GELU(x·gᵀ + bg) for a feed-forward
   projection w = [v; g] (2 × out rows of `in`; diffusers' GEGLU splits proj(x) into value and gate), fp32 sums of bf16
   dot products (vdpbf16ps), the GELU and the product on the sums, rounded to bf16 once. oneDNN computes the two halves
   as two products, the gate's written out and read back (SD1.5's 8192 × 320 → 2 × 1280 at ~70 % of these cores'
   bf16 peak); this runs it at ~87 % and writes only the result.

   `pack_weight` lays w out (once per call: a small pass next to the product) as wp[out / 16][in / 2][32]: per panel
   16 value columns then the same 16 gate columns, two bf16 of a column (inputs 2p, 2p + 1) per 32-bit lane. `geglu`
   then computes tiles of ROWS rows × one panel: 28 registers of fp32 sums over the whole input width, each step one
   32-bit broadcast of a row's pair of inputs (read straight from x) against the panel's two vectors. A thread goes
   through its tiles one block of panels (WEIGHT_BLOCK bytes, kept in its L2) at a time. The input width must be even
   and `out` a multiple of 16. */
#include <stdlib.h>

#include "bf16_vector.h"

#define ROWS 14         /* rows of x per register tile: 14 × 2 accumulators + 2 weight vectors + 1 broadcast */
#define PANEL 16        /* output columns per packed panel (and as many gate columns) */
#define WEIGHT_BLOCK (1 << 20)   /* bytes of packed weight a thread's tiles go through in turn */

/* w: 2 × out rows of `in` bf16, `stride` apart (value rows, then gate rows) → wp[out / PANEL][in / 2][2 · PANEL] */
void pack_weight(const bf16 *w, long stride, long out, long in, uint32_t *wp, int threads) {
  long pairs = in / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long panel = 0; panel < out / PANEL; panel++)
    for (long j = 0; j < 2 * PANEL; j++) {
      const bf16 *row = w + (j < PANEL ? panel * PANEL + j : out + panel * PANEL + j - PANEL) * stride;
      uint32_t *column = wp + panel * pairs * 2 * PANEL + j;
      for (long p = 0; p < pairs; p++) column[p * 2 * PANEL] = pair_at(row + 2 * p);
    }
}

/* sums[r][v] = Σ_p x[r][2p, 2p + 1] · w[p][v·PANEL .. + PANEL) over `pairs` pairs of inputs (v = 0: the value's
   columns, 1: the gate's), x's rows `stride` apart */
static inline __attribute__((always_inline)) void tile(const bf16 *x, long stride, const uint32_t *w, long pairs,
                                                       __m512 sums[ROWS][2]) {
  for (int r = 0; r < ROWS; r++) sums[r][0] = sums[r][1] = _mm512_setzero_ps();
  for (long p = 0; p < pairs; p++) {
    __m512bh a = (__m512bh)_mm512_loadu_si512(w + p * 2 * PANEL);
    __m512bh b = (__m512bh)_mm512_loadu_si512(w + p * 2 * PANEL + PANEL);
    for (int r = 0; r < ROWS; r++) {
      __m512bh inputs = (__m512bh)_mm512_set1_epi32((int)pair_at(x + r * stride + 2 * p));
      sums[r][0] = _mm512_dpbf16_ps(sums[r][0], inputs, a);
      sums[r][1] = _mm512_dpbf16_ps(sums[r][1], inputs, b);
    }
  }
}

static inline __m512 load_bias(const bf16 *bias, long j) {
  return bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((const __m256i *)(bias + j))), 16))
              : _mm512_setzero_ps();
}

static inline void store(bf16 *y, __m512 v) {
  _mm256_storeu_si256((__m256i *)y, (__m256i)_mm512_cvtneps_pbh(v));
}

/* GELU(g) = g · (1 + erf(g / √2)) / 2, erf by Abramowitz & Stegun 7.1.26 (error 1.5e-7; ~1e-4 with exp2_ps) */
static inline __m512 gelu_ps(__m512 g) {
  __m512 z = _mm512_mul_ps(g, _mm512_set1_ps(0.70710678f));
  __m512 a = _mm512_abs_ps(z);
  __m512 t = _mm512_rcp14_ps(_mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  __m512 e = exp2_ps(_mm512_mul_ps(_mm512_mul_ps(a, a), _mm512_set1_ps(-1.442695041f)));
  __m512 erf_abs = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.f));                /* erf(|z|) */
  __m512 erf = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(erf_abs),  /* the sign of z */
      _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int)0x80000000u))));
  return _mm512_mul_ps(_mm512_mul_ps(g, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf, _mm512_set1_ps(1.f)));
}

/* y[rows][out] = (x·vᵀ + bv) · GELU(x·gᵀ + bg), x's rows `x_stride` apart, y's `out`; bias: 2 × out (or none) */
void geglu(const bf16 *x, long x_stride, const uint32_t *wp, const bf16 *bias, bf16 *y, long rows, long out,
           long in, int threads) {
  long pairs = in / 2, tiles = (rows + ROWS - 1) / ROWS, panels = out / PANEL;
  long fit = WEIGHT_BLOCK / (pairs * 2 * PANEL * (long)sizeof *wp), most = fit < 1 ? 1 : fit;
  long blocks = (panels + most - 1) / most, per_block = (panels + blocks - 1) / blocks;   /* even blocks */
#pragma omp parallel num_threads(threads)
  {
    uint32_t *tail = malloc(pairs * ROWS * sizeof *tail);   /* a last tile's rows, the first repeated */
#pragma omp for schedule(static)
    for (long unit = 0; unit < blocks * tiles; unit++) {   /* a thread's tiles share their weight block */
      long block = unit / tiles, first = unit % tiles * ROWS, count = rows - first < ROWS ? rows - first : ROWS;
      const bf16 *xs = x + first * x_stride;
      long stride = x_stride;
      if (count < ROWS) {
        for (long r = 0; r < ROWS; r++) memcpy(tail + r * pairs, xs + (r < count ? r : 0) * x_stride, pairs * 4);
        xs = (const bf16 *)tail;
        stride = 2 * pairs;
      }
      long last = (block + 1) * per_block < panels ? (block + 1) * per_block : panels;
      for (long panel = block * per_block; panel < last; panel++) {
        __m512 sums[ROWS][2];
        long j = panel * PANEL;
        tile(xs, stride, wp + panel * pairs * 2 * PANEL, pairs, sums);
        __m512 value_bias = load_bias(bias, j), gate_bias = load_bias(bias ? bias + out : 0, j);
        for (long r = 0; r < count; r++)
          store(y + (first + r) * out + j, _mm512_mul_ps(_mm512_add_ps(sums[r][0], value_bias),
                                                         gelu_ps(_mm512_add_ps(sums[r][1], gate_bias))));
      }
    }
    free(tail);
  }
}
