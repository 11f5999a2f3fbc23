/* bf16 linear layers for a decoding step on a CPU with AVX512-BF16 (chatforge.models.gemv).

   y = x . W^T (+ bias), x and W in bf16, each output a float32 sum rounded once to bf16. W is
   packed as [N / 16][K / 2][16][2]: 16 output columns side by side, two k at a time, which is what
   one VDPBF16PS takes. Each output's sum runs over k pairs in order, the same instructions whatever
   the other rows of the batch, the thread count or the column block: a row's outputs do not depend
   on the batch it is in. Threads come from the OpenMP pool already loaded with torch. */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

/* MM rows of x against column block w0 and, when `two`, the block after it. */
#define ROWS(MM)                                                                                   \
  static void rows##MM(const uint16_t *x, int ldx, int K, const uint16_t *w0, int two,           \
                       const float *bias, uint16_t *y, int ldy) {                                 \
    __m512 a0[MM], a1[MM];                                                                        \
    const uint16_t *w1 = w0 + (size_t)K * 16;                                                     \
    for (int m = 0; m < MM; ++m) a0[m] = a1[m] = _mm512_setzero_ps();                              \
    if (two) {                                                                                    \
      for (int p = 0; p < K / 2; ++p) {                                                           \
        __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + 32 * p);                                  \
        __m512bh v1 = (__m512bh)_mm512_loadu_si512(w1 + 32 * p);                                  \
        for (int m = 0; m < MM; ++m) {                                                            \
          int32_t pair = *(const int32_t *)(x + (size_t)m * ldx + 2 * p);                         \
          __m512bh s = (__m512bh)_mm512_set1_epi32(pair);                                         \
          a0[m] = _mm512_dpbf16_ps(a0[m], s, v0);                                                 \
          a1[m] = _mm512_dpbf16_ps(a1[m], s, v1);                                                 \
        }                                                                                         \
      }                                                                                           \
    } else {                                                                                      \
      for (int p = 0; p < K / 2; ++p) {                                                           \
        __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + 32 * p);                                  \
        for (int m = 0; m < MM; ++m) {                                                            \
          int32_t pair = *(const int32_t *)(x + (size_t)m * ldx + 2 * p);                         \
          a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)_mm512_set1_epi32(pair), v0);                \
        }                                                                                         \
      }                                                                                           \
    }                                                                                             \
    __m512 b0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();                               \
    __m512 b1 = bias && two ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();                   \
    for (int m = 0; m < MM; ++m) {                                                                \
      __m512 r0 = bias ? _mm512_add_ps(a0[m], b0) : a0[m];                                        \
      _mm256_storeu_si256((__m256i *)(y + (size_t)m * ldy), (__m256i)_mm512_cvtneps_pbh(r0));     \
      if (two) {                                                                                  \
        __m512 r1 = bias ? _mm512_add_ps(a1[m], b1) : a1[m];                                      \
        _mm256_storeu_si256((__m256i *)(y + (size_t)m * ldy + 16), (__m256i)_mm512_cvtneps_pbh(r1)); \
      }                                                                                           \
    }                                                                                             \
  }
ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)

typedef void (*rows_fn)(const uint16_t *, int, int, const uint16_t *, int, const float *, uint16_t *, int);
static const rows_fn ROWS_OF[9] = {0, rows1, rows2, rows3, rows4, rows5, rows6, rows7, rows8};

/* x: M x K bf16 (row stride ldx, K even); w: N x K packed (N a multiple of 16); bias: N float32
   or NULL; y: M x N bf16 (row stride ldy). `threads` split the columns, two blocks at a time, and
   each block is read from memory once for all rows. */
void chatforge_linear_bf16(const uint16_t *x, int M, int ldx, int K, const uint16_t *w, int N,
                           const float *bias, uint16_t *y, int ldy, int threads) {
  int blocks = N / 16, pairs = (blocks + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (pairs > 1 && threads > 1)
  for (int q = 0; q < pairs; ++q) {
    int b = 2 * q, two = b + 1 < blocks;
    const uint16_t *wb = w + (size_t)b * K * 16;
    const float *bb = bias ? bias + 16 * b : NULL;
    for (int m0 = 0; m0 < M; m0 += 8) {
      int mm = M - m0 < 8 ? M - m0 : 8;
      ROWS_OF[mm](x + (size_t)m0 * ldx, ldx, K, wb, two, bb, y + (size_t)m0 * ldy + 16 * b, ldy);
    }
  }
}

/* w: N x K bf16 row-major (row stride ldw) -> out: the packed layout above. */
void chatforge_pack_bf16(const uint16_t *w, int N, int K, int ldw, uint16_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int b = 0; b < N / 16; ++b) {
    uint32_t *o = (uint32_t *)(out + (size_t)b * K * 16);
    for (int i = 0; i < 16; ++i) {
      const uint32_t *row = (const uint32_t *)(w + (size_t)(16 * b + i) * ldw);
      for (int p = 0; p < K / 2; ++p) o[16 * p + i] = row[p];
    }
  }
}
