/* softmax(q·kᵀ·scale)·v for fp32 multi-head attention on AVX2/FMA CPUs (512-bit vectors where the CPU has
   AVX-512), one pass over the keys per block of query rows (flash attention): the fast fp32 path's counterpart of
   flash_attention.c, with fp32 products (FMA) throughout — no rounding beyond fp32's, the scores never leave the
   L1 cache, and no product of the whole score matrix.

   Per (image, head), `pack` lays out the keys and values once for the products:
     kp[key block of KEYS][width][KEYS keys]: a width of KEYS consecutive keys side by side;
     vp[key][padded width]: a value row, its width padded with zeros to whole vectors.
   Then `attend`, per ROWS query rows and CHUNK keys at a time:
     1. scores s = q·kᵀ (ROWS × KEYS sums in registers over the width), and their maximum;
     2. softmax numerators p = 2^((s − max)·scale·log2 e) in place of s, their sum, and the running output and sum
        rescaled for the new maximum (the online softmax);
     3. o += p·v (ROWS × up to GROUP vectors of widths in registers, over the chunk's keys).
   At the end each output row is o / sum. Keys are padded to a multiple of KEYS with zeros, masked out of the
   maximum and of p. */
#include "fp32_vector.h"

#ifdef __AVX512F__   /* 32 registers */
#define ROWS 8       /* score tile 8 × 2 vectors, weighted tile 8 × 3: 24 sums + 3 values + 1 broadcast */
#define GROUP 3
#else                /* AVX2: 16 registers */
#define ROWS 6       /* score tile 6 × 2 vectors, weighted tile 6 × 2: 12 sums + 2 values + 1 broadcast */
#define GROUP 2
#endif

#define KEYS (2 * LANES)     /* keys per score tile */
#define CHUNK 512            /* keys per online-softmax step: ROWS × CHUNK scores (12–16 KiB) stay in L1 */
#define MAX_WIDTH 256

static inline float reduce(vec x, int largest) {
  float lanes[LANES];
  store(lanes, x);
  float r = lanes[0];
  for (int i = 1; i < LANES; i++) r = largest ? (lanes[i] > r ? lanes[i] : r) : r + lanes[i];
  return r;
}

/* keys and values of every (image, head): (images, tokens, heads · width) rows `stride` elements apart, padded to
   `padded` keys; kp and vp hold each (image, head) in turn */
void pack(const float *k, const float *v, long images, long heads, long stride, long tokens, long padded, long width,
          float *kp, float *vp, int threads) {
  long padded_width = (width + LANES - 1) / LANES * LANES;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long image_head = 0; image_head < images * heads; image_head++) {
    long offset = image_head / heads * tokens * stride + image_head % heads * width;
    float *keys = kp + image_head * padded * width, *values = vp + image_head * padded * padded_width;
    for (long t = 0; t < padded; t++) {
      float *key = keys + t / KEYS * width * KEYS + t % KEYS, *value = values + t * padded_width;
      for (long d = 0; d < width; d++) key[d * KEYS] = t < tokens ? k[offset + t * stride + d] : 0.f;
      for (long d = 0; d < padded_width; d++) value[d] = t < tokens && d < width ? v[offset + t * stride + d] : 0.f;
    }
  }
}

/* s[r][j .. j + KEYS) = q_r · k for the KEYS keys of key block kb, best[r] = max(best[r], those scores); with
   `masked`, only the first `valid` keys count for the maximum (the rest are padding, score 0) */
static inline __attribute__((always_inline)) void score_tile(const float *const *q, const float *kp, long width,
                                                             long kb, long j, float *s, vec *best, const int masked,
                                                             long valid) {
  vec acc[ROWS][2];
  for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = set1(0.f);
  const float *block = kp + kb * width * KEYS;
  for (long d = 0; d < width; d++) {
    vec a = load(block + d * KEYS), b = load(block + d * KEYS + LANES);
    for (int r = 0; r < ROWS; r++) {
      vec x = set1(q[r][d]);
      acc[r][0] = fmadd(x, a, acc[r][0]);
      acc[r][1] = fmadd(x, b, acc[r][1]);
    }
  }
  for (int r = 0; r < ROWS; r++) {
    store(s + r * CHUNK + j, acc[r][0]);
    store(s + r * CHUNK + j + LANES, acc[r][1]);
    if (masked) {   /* through memory: the padding's scores become −1e30 for the maximum and the softmax */
      for (long i = valid - j > 0 ? valid - j : 0; i < KEYS; i++) s[r * CHUNK + j + i] = -1e30f;
      acc[r][0] = load(s + r * CHUNK + j);
      acc[r][1] = load(s + r * CHUNK + j + LANES);
    }
    best[r] = vmax(best[r], vmax(acc[r][0], acc[r][1]));
  }
}

/* o[r][width vectors b0 .. b0 + G) += Σ p[r][j]·v_j over the chunk's `count` keys (summed apart, then added:
   sums of CHUNK terms, not of every key, keep the error of 4096 keys at PyTorch's) */
static inline __attribute__((always_inline)) void weighted(const float *p, const float *vp, long padded_width,
                                                           long count, float *o, long b0, const int G) {
  vec acc[ROWS][GROUP];
  for (int r = 0; r < ROWS; r++)
    for (int g = 0; g < G; g++) acc[r][g] = set1(0.f);
  for (long j = 0; j < count; j++) {
    vec w[GROUP];
    for (int g = 0; g < G; g++) w[g] = load(vp + j * padded_width + (b0 + g) * LANES);
    for (int r = 0; r < ROWS; r++) {
      vec x = set1(p[r * CHUNK + j]);
      for (int g = 0; g < G; g++) acc[r][g] = fmadd(x, w[g], acc[r][g]);
    }
  }
  for (int r = 0; r < ROWS; r++)
    for (int g = 0; g < G; g++) {
      float *od = o + r * MAX_WIDTH + (b0 + g) * LANES;
      store(od, vadd(load(od), acc[r][g]));
    }
}

/* every task, on `threads` threads: task = ((image · heads + head) · row tasks + i), the query rows [i ·
   task_rows, (i + 1) · task_rows) of that image and head (task_rows rounded up to whole tiles of ROWS). q, out:
   (images, tokens_q, heads · width), rows `stride` / `out_stride` elements apart; kp, vp: `pack`'s output for each
   (image, head) in that order, keys padded to `padded`. */
void attend(const float *q, long stride, const float *kp_all, const float *vp_all, float *out, long out_stride,
            long images, long heads, long tokens_q, long tokens_k, long padded, long width, float scale,
            long task_rows, int threads) {
  long padded_width = (width + LANES - 1) / LANES * LANES, vectors = padded_width / LANES;
  task_rows = (task_rows + ROWS - 1) / ROWS * ROWS;
  long row_tasks = (tokens_q + task_rows - 1) / task_rows;
  float factor = scale * 1.4426950408889634f;   /* e^x = 2^(x·log2 e) */
#pragma omp parallel num_threads(threads)
  {
  float s[ROWS * CHUNK] __attribute__((aligned(64)));
  float o[ROWS * MAX_WIDTH] __attribute__((aligned(64)));
#pragma omp for schedule(static)
  for (long task = 0; task < images * heads * row_tasks; task++) {
    long image_head = task / row_tasks, image = image_head / heads, head = image_head % heads;
    const float *kp = kp_all + image_head * padded * width, *vp = vp_all + image_head * padded * padded_width;
    long first = task % row_tasks * task_rows, last = first + task_rows < tokens_q ? first + task_rows : tokens_q;
    for (long r0 = first; r0 < last; r0 += ROWS) {
      const float *rows[ROWS];   /* past the last row: the last row again, computed and not stored */
      float running_max[ROWS], sum[ROWS];
      for (int r = 0; r < ROWS; r++) {
        rows[r] = q + (image * tokens_q + (r0 + r < last ? r0 + r : last - 1)) * stride + head * width;
        running_max[r] = -1e30f;
        sum[r] = 0.f;
        memset(o + r * MAX_WIDTH, 0, padded_width * sizeof(float));
      }
      for (long c = 0; c < padded; c += CHUNK) {
        long count = padded - c < CHUNK ? padded - c : CHUNK, valid = tokens_k - c, j = 0;
        vec best[ROWS];
        for (int r = 0; r < ROWS; r++) best[r] = set1(-1e30f);
        for (; j < count && j + KEYS <= valid; j += KEYS) score_tile(rows, kp, width, c / KEYS + j / KEYS, j, s,
                                                                     best, 0, valid);
        for (; j < count; j += KEYS) score_tile(rows, kp, width, c / KEYS + j / KEYS, j, s, best, 1, valid);
        for (int r = 0; r < ROWS; r++) {
          float top = reduce(best[r], 1) * factor;
          float largest = top > running_max[r] ? top : running_max[r];
          vec shift = set1(-largest), factors = set1(factor), total = set1(0.f);
          for (long i = 0; i < count; i += LANES) {
            vec e = exp2_ps(fmadd(load(s + r * CHUNK + i), factors, shift));
            total = vadd(total, e);
            store(s + r * CHUNK + i, e);
          }
          float rescale = reduce(exp2_ps(set1(running_max[r] - largest)), 1);
          sum[r] = sum[r] * rescale + reduce(total, 0);
          running_max[r] = largest;
          if (rescale != 1.f)
            for (long d = 0; d < padded_width; d += LANES)
              store(o + r * MAX_WIDTH + d, vmul(load(o + r * MAX_WIDTH + d), set1(rescale)));
        }
        const float *vc = vp + c * padded_width;
        long b = 0;
        for (; b + GROUP <= vectors; b += GROUP) weighted(s, vc, padded_width, count, o, b, GROUP);
        if (vectors - b == 2) weighted(s, vc, padded_width, count, o, b, 2);
        if (vectors - b == 1) weighted(s, vc, padded_width, count, o, b, 1);
      }
      for (int r = 0; r < ROWS && r0 + r < last; r++) {
        float *dst = out + (image * tokens_q + r0 + r) * out_stride + head * width, inverse = 1.f / sum[r];
        for (long d = 0; d < width; d++) dst[d] = o[r * MAX_WIDTH + d] * inverse;
      }
    }
  }
  }
}
