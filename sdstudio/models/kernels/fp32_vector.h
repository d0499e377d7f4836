/* Shared by the fp32 kernels of the fast fp32 path (flash_attention_fp32.c, gelu_product.c): vectors of LANES floats
   — AVX2/FMA (8), or AVX-512 (16) where the CPU has it — and a vector 2^x. Included as text by
   models/native.kernel_source, so a kernel's build and its cache key see it. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define LANES 16
typedef __m512 vec;
#define load _mm512_loadu_ps
#define store _mm512_storeu_ps
#define set1 _mm512_set1_ps
#define fmadd _mm512_fmadd_ps
#define vmax _mm512_max_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vdiv _mm512_div_ps
#define vabs _mm512_abs_ps
#define round_nearest(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define power_of_two(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), \
                                                                               _mm512_set1_epi32(127)), 23))
/* where x ≥ 0 then a else b, lane by lane */
#define where_not_negative(x, a, b) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), b, a)
#else
#define LANES 8
typedef __m256 vec;
#define load _mm256_loadu_ps
#define store _mm256_storeu_ps
#define set1 _mm256_set1_ps
#define fmadd _mm256_fmadd_ps
#define vmax _mm256_max_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vdiv _mm256_div_ps
#define vabs(x) _mm256_andnot_ps(_mm256_set1_ps(-0.f), x)
#define round_nearest(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define power_of_two(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), \
                                                                               _mm256_set1_epi32(127)), 23))
#define where_not_negative(x, a, b) _mm256_blendv_ps(a, b, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ))
#endif

/* 2^x for x ≤ 0: 2^round(x) · 2^f with f in [−1/2, 1/2] by a degree-6 polynomial (relative error 2e-9, below
   fp32's rounding); x below −126 gives 0, so a masked (−1e30) score vanishes */
static inline vec exp2_ps(vec x) {
  x = vmax(x, set1(-127.f));
  vec n = round_nearest(x), f = vsub(x, n);
  vec p = set1(1.5337577e-4f);
  p = fmadd(p, f, set1(1.3399860e-3f));
  p = fmadd(p, f, set1(9.6185198e-3f));
  p = fmadd(p, f, set1(5.5503290e-2f));
  p = fmadd(p, f, set1(2.4022646e-1f));
  p = fmadd(p, f, set1(6.9314718e-1f));
  p = fmadd(p, f, set1(1.f));
  return vmul(p, power_of_two(n));   /* n = −127: the exponent field 0, a zero */
}
