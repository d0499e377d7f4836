/* Shared by the AVX512-BF16 kernels (flash_attention.c, geglu.c): bf16 pairs and a vector 2^x. Included as text by
   models/native.kernel_source, so a kernel's build and its cache key see it. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

/* two consecutive bf16 as one 32-bit lane (the operand vdpbf16ps takes) */
static inline uint32_t pair_at(const bf16 *x) {
  uint32_t pair;
  memcpy(&pair, x, sizeof pair);
  return pair;
}

/* 2^x: 2^round(x) · 2^f with f in [−1/2, 1/2] by a cubic (relative error 7.5e-5, below bf16's rounding);
   scalef(p, −1e30) = 0, so a masked (−1e30) score vanishes */
static inline __m512 exp2_ps(__m512 x) {
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0.055171628f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24261117f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69326103f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99992806f));
  return _mm512_scalef_ps(p, n);
}
