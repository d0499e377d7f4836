/* Copies of a file's weights, read with pread across OpenMP threads: fp16 / fp32 → bf16, fp16 → fp32, or 2- and
   4-byte values as they are, convolution weights laid channels-last on the way (models/conversion.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#define BLOCK_BYTES (256 * 1024)   /* source bytes per task: a read and its conversion stay in the core's cache */

static inline uint32_t float_bits_from_half(uint32_t half) {
    uint32_t sign = (half & 0x8000u) << 16, exponent = (half >> 10) & 0x1fu, mantissa = half & 0x3ffu;
    float subnormal = (float)mantissa * 5.9604644775390625e-8f;        /* mantissa · 2⁻²⁴, exact */
    uint32_t subnormal_bits;
    memcpy(&subnormal_bits, &subnormal, 4);
    uint32_t finite = exponent == 0 ? subnormal_bits : (exponent + 112) << 23 | mantissa << 13;
    return sign | (exponent == 31 ? 0x7f800000u | mantissa << 13 : finite);
}

static inline uint16_t bf16_from_bits(uint32_t bits) {
    uint16_t rounded = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);   /* round to nearest even */
    return (bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : rounded;                  /* any NaN: torch's NaN */
}

enum conversion { AS_IS = 0, HALF_TO_BF16 = 1, FLOAT_TO_BF16 = 2, HALF_TO_FLOAT = 3, AS_IS_4 = 4 };

static int source_size(int conversion) { return conversion == FLOAT_TO_BF16 || conversion == AS_IS_4 ? 4 : 2; }
static int copy_size(int conversion) { return conversion == HALF_TO_FLOAT || conversion == AS_IS_4 ? 4 : 2; }

/* out[i] = in[i] for `count` values, converted: fp16 or fp32 to bf16 with torch's rounding bit for bit, fp16 to fp32
   (exact), or 2- and 4-byte values as they are */
static void convert(const void *in, int conversion, void *copy, long count) {
    long i = 0;
    if (conversion == AS_IS || conversion == AS_IS_4) { memcpy(copy, in, copy_size(conversion) * count); return; }
    if (conversion == HALF_TO_FLOAT) {
        uint32_t *out = copy;
#if defined(__AVX512F__)
        for (; i + 16 <= count; i += 16)
            _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)in + i))));
#endif
        for (; i < count; i++) out[i] = float_bits_from_half(((const uint16_t *)in)[i]);
        return;
    }
    uint16_t *out = copy;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), infinity = _mm512_set1_epi32(0x7f800000);
    const __m512i nan = _mm512_set1_epi32(0x7fc0);
    for (; i + 16 <= count; i += 16) {
        __m512i bits = conversion == HALF_TO_BF16
            ? _mm512_castps_si512(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)in + i))))
            : _mm512_loadu_si512((const uint32_t *)in + i);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
        __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, bias), odd), 16);
        __mmask16 is_nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, magnitude), infinity);
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, is_nan, nan)));
    }
#endif
    for (; i < count; i++)
        out[i] = bf16_from_bits(conversion == HALF_TO_BF16 ? float_bits_from_half(((const uint16_t *)in)[i])
                                                 : ((const uint32_t *)in)[i]);
}

/* dst[r][t][c] = src[r][c][t] for rows × channels × taps values of `type` */
#define LAY_TAPS_OUTSIDE(type, dst, src, rows, channels, taps)                                     \
    for (long r = 0; r < (rows); r++)                                                              \
        for (long c = 0; c < (channels); c++)                                                      \
            for (long t = 0; t < (taps); t++)                                                      \
                ((type *)(dst))[(r * (taps) + t) * (channels) + c] =                               \
                    ((const type *)(src))[(r * (channels) + c) * (taps) + t]

/* For each of `count` tensors k: rows[k] × channels[k] × taps[k] values (fp16, fp32 or any 2- or 4-byte type, per
   `conversion`) read from `fd` at offsets[k], written to dsts[k] (bf16, fp32, or the same type) with the taps moved
   outside the channels (dst[r][t][c] = src[r][c][t]: a convolution weight's channels-last layout; taps 1 = the same
   layout). Blocks of rows of every tensor are shared out to `threads` threads, so the destination's first-touch
   page faults run in parallel too. Returns 0, -1 when a read came up short (the file changed), or -2 when a block's
   buffer could not be allocated. */
int read_weights(int fd, int conversion, long count, const long *offsets, char *const *dsts, const long *rows,
                 const long *channels, const long *taps, int threads) {
    int in_size = source_size(conversion), out_size = copy_size(conversion);
    long *first_block = malloc((count + 1) * sizeof(long)), *block_rows = malloc((count + 1) * sizeof(long));
    if (!first_block || !block_rows) { free(first_block); free(block_rows); return -2; }
    first_block[0] = 0;
    for (long k = 0; k < count; k++) {
        long row_bytes = channels[k] * taps[k] * in_size;
        block_rows[k] = BLOCK_BYTES / row_bytes > 0 ? BLOCK_BYTES / row_bytes : 1;
        first_block[k + 1] = first_block[k] + (rows[k] + block_rows[k] - 1) / block_rows[k];
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        char *source = NULL, *converted = NULL;
        long source_bytes = 0, converted_count = 0, k = 0;
#pragma omp for schedule(dynamic, 1)
        for (long block = 0; block < first_block[count]; block++) {
            while (first_block[k + 1] <= block) k++;
            long per_row = channels[k] * taps[k], row_bytes = per_row * in_size;
            long first = (block - first_block[k]) * block_rows[k];
            long n = rows[k] - first < block_rows[k] ? rows[k] - first : block_rows[k];
            long want = n * row_bytes, got = 0;
            if (want > source_bytes) { free(source); source = malloc(source_bytes = want); }
            if (!source) { source_bytes = 0; failed = 2; continue; }
            while (got < want) {
                ssize_t read = pread(fd, source + got, want - got, offsets[k] + first * row_bytes + got);
                if (read <= 0) break;
                got += read;
            }
            if (got < want) { failed = failed ? failed : 1; continue; }
            char *out = dsts[k] + first * per_row * out_size;
            if (taps[k] == 1) { convert(source, conversion, out, n * per_row); continue; }
            if (n * per_row > converted_count) {
                free(converted);
                converted = malloc(out_size * (converted_count = n * per_row));
            }
            if (!converted) { converted_count = 0; failed = 2; continue; }
            convert(source, conversion, converted, n * per_row);
            if (out_size == 2) LAY_TAPS_OUTSIDE(uint16_t, out, converted, n, channels[k], taps[k]);
            else LAY_TAPS_OUTSIDE(uint32_t, out, converted, n, channels[k], taps[k]);
        }
        free(source);
        free(converted);
    }
    free(first_block);
    free(block_rows);
    return -failed;
}
