/* bf16 kernels for a decoding step on a CPU with AVX512-BF16 (chatforge.models.kernels): linear
   layers and one query token's attention.

   Linear layers:

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

/* One query token's attention, bf16 in and out, float32 inside, for a decoding step.
   q: (B, H, D) with strides (sqb, sqh, 1); k, v: (B, KV, T, D) with strides (skb, skh, skt, 1);
   keep: (B, T) bytes, nonzero = attend (row stride sm), or NULL; out: (B, H, D) contiguous;
   work: B * H * (T rounded up to 16) floats. Query head h reads key/value head h / (H / KV). Per head:
   s_t = (q . k_t) * scale, p_t = exp(s_t - max s), out = (sum_t p_t v_t) / (sum_t p_t), float32
   throughout in a fixed order, rounded once to bf16. D must be a multiple of 16. */
#include <math.h>

static inline __m512 load16_m256(__m256i x) { /* 16 bf16 -> 16 float32 */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

static inline __m512 load16(const uint16_t *p) { return load16_m256(_mm256_loadu_si256((const __m256i *)p)); }

static inline __m512 exp16(__m512 x) { /* exp, ~1 float32 ulp (Cephes' expf polynomial); x >= -87 */
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

#define MAX_GROUP 8

/* `heads` query heads (a constant where inlined: their accumulators stay in registers) against
   one key/value head of one row. */
static inline __attribute__((always_inline)) void attend(
    const int heads, const uint16_t *const *qh, float *const *sh, const uint16_t *kb, long skt,
    const uint16_t *vb, long svt, const uint8_t *mb, int T, int width, int D, float scale, uint16_t *const *oh) {
  float top[MAX_GROUP], total[MAX_GROUP];
  for (int j = 0; j < heads; ++j) top[j] = -INFINITY;
  for (int t = 0; t < T; ++t) { /* scores: each key read once for all heads */
    if (mb && !mb[t]) {
      for (int j = 0; j < heads; ++j) sh[j][t] = -INFINITY;
      continue;
    }
    const uint16_t *kt = kb + t * skt;
    __m512 acc[MAX_GROUP];
    for (int j = 0; j < heads; ++j) acc[j] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 32) { /* two dimensions per lane: one VDPBF16PS */
      __mmask32 part = D - d >= 32 ? 0xffffffffu : (1u << (D - d)) - 1;
      __m512bh kd = (__m512bh)_mm512_maskz_loadu_epi16(part, kt + d);
      for (int j = 0; j < heads; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_maskz_loadu_epi16(part, qh[j] + d), kd);
    }
    for (int j = 0; j < heads; ++j) {
      float x = _mm512_reduce_add_ps(acc[j]) * scale;
      sh[j][t] = x;
      top[j] = x > top[j] ? x : top[j];
    }
  }
  for (int j = 0; j < heads; ++j) { /* p = exp(s - max), 16 keys at a time; masked keys 0 */
    for (int t = T; t < width; ++t) sh[j][t] = -INFINITY;
    __m512 sum = _mm512_setzero_ps(), m = _mm512_set1_ps(top[j]);
    for (int t = 0; t < width; t += 16) {
      __m512 x = _mm512_loadu_ps(sh[j] + t);
      __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      x = _mm512_max_ps(_mm512_sub_ps(x, m), _mm512_set1_ps(-87.0f));
      __m512 e = _mm512_maskz_mov_ps(live, exp16(x));
      _mm512_storeu_ps(sh[j] + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    total[j] = _mm512_reduce_add_ps(sum);
  }
  for (int d = 0; d < D; d += 16) { /* out = sum_t p_t v_t / sum_t p_t: each value read once */
    __m512 acc[MAX_GROUP];
    for (int j = 0; j < heads; ++j) acc[j] = _mm512_setzero_ps();
    for (int t = 0; t < T; ++t) {
      __m512 vt = load16(vb + t * svt + d); /* masked keys have p = 0 */
      for (int j = 0; j < heads; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(sh[j][t]), vt, acc[j]);
    }
    for (int j = 0; j < heads; ++j) {
      __m512 o = _mm512_div_ps(acc[j], _mm512_set1_ps(total[j]));
      _mm256_storeu_si256((__m256i *)(oh[j] + d), (__m256i)_mm512_cvtneps_pbh(o));
    }
  }
}

void chatforge_attention_bf16(const uint16_t *q, long sqb, long sqh, const uint16_t *k, const uint16_t *v,
                              long skb, long skh, long skt, long svb, long svh, long svt,
                              const uint8_t *keep, long sm, uint16_t *out, int B, int H, int KV, int T,
                              int D, float scale, float *work, int threads) {
  int group = H / KV, width = (T + 15) / 16 * 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * KV > 1)
  for (int task = 0; task < B * KV; ++task) {
    int b = task / KV, g = task % KV;
    const uint16_t *kb = k + b * skb + g * skh, *vb = v + b * svb + g * svh;
    const uint8_t *mb = keep ? keep + b * sm : NULL;
    for (int j0 = 0; j0 < group; j0 += MAX_GROUP) { /* query heads of this key/value head, together */
      int heads = group - j0 < MAX_GROUP ? group - j0 : MAX_GROUP;
      const uint16_t *qh[MAX_GROUP];
      float *sh[MAX_GROUP];
      uint16_t *oh[MAX_GROUP];
      for (int j = 0; j < heads; ++j) {
        size_t h = (size_t)g * group + j0 + j;
        qh[j] = q + b * sqb + h * sqh;
        sh[j] = work + ((size_t)b * H + h) * width;
        oh[j] = out + ((size_t)b * H + h) * D;
      }
#define CASE(n) case n: attend(n, qh, sh, kb, skt, vb, svt, mb, T, width, D, scale, oh); break;
      switch (heads) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) }
#undef CASE
    }
  }
}

/* A Llama-shaped layer's elementwise steps around its products, for a decoding step's few rows.
   bf16 operations round as torch's do (each bf16 result computed in float32 and rounded to bf16
   once); the float32 steps inside (the norm's mean of squares, silu's exp) run in an order and
   with an exp of their own, so a rare output differs from torch's by one bf16 step. n and the
   head dimension must be multiples of 16. */

static inline void store16(uint16_t *p, __m512 x) { /* 16 float32 -> 16 bf16, round to nearest even */
  _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x));
}

static inline __m512 round16(__m512 x) { /* x rounded to bf16, as float32 */
  return load16_m256((__m256i)_mm512_cvtneps_pbh(x));
}

/* h (rows x n, row stride ldh) += y (row stride ldy) when y is not NULL, then
   out (rows x n, contiguous) = weight * bf16(h * (1 / sqrt(mean(h^2) + eps))), as `LlamaRMSNorm`. */
void chatforge_add_rms_norm_bf16(uint16_t *h, int rows, int n, long ldh, const uint16_t *y, long ldy,
                                 const uint16_t *weight, float eps, uint16_t *out) {
  for (int r = 0; r < rows; ++r) {
    uint16_t *hr = h + r * ldh;
    __m512 squares = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
      __m512 x = load16(hr + i);
      if (y) {
        x = round16(_mm512_add_ps(x, load16(y + r * ldy + i)));
        store16(hr + i, x);
      }
      squares = _mm512_add_ps(squares, _mm512_mul_ps(x, x)); /* each square rounded, as pow(2) */
    }
    __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
    for (int i = 0; i < n; i += 16) {
      __m512 normed = round16(_mm512_mul_ps(load16(hr + i), scale));
      store16(out + (size_t)r * n + i, _mm512_mul_ps(load16(weight + i), normed));
    }
  }
}

/* x (rows x 2n, row stride ldx) holds gate | up: out (rows x n) = bf16(silu(gate)) * up, silu in
   float32 (gate / (1 + exp(-gate)), rounded once), as torch computes it for bf16. */
void chatforge_silu_mul_bf16(const uint16_t *x, int rows, int n, long ldx, uint16_t *out) {
  for (int r = 0; r < rows; ++r) {
    const uint16_t *g = x + r * ldx, *u = g + n;
    for (int i = 0; i < n; i += 16) {
      __m512 gv = load16(g + i);
      __m512 e = exp16(_mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(-87.0f)),
                                     _mm512_set1_ps(88.0f)));
      __m512 silu = round16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
      store16(out + (size_t)r * n + i, _mm512_mul_ps(silu, load16(u + i)));
    }
  }
}

/* Rotary embedding of q's and k's heads, in place: x (rows, heads, D) with strides (sxr, sxh, 1),
   cos and sin (rows, D) bf16 contiguous: x = bf16(x * cos) + bf16(rotate_half(x) * sin), where
   rotate_half(x) = (-x[D/2:], x[:D/2]), each product and the sum rounded to bf16 as in transformers. */
void chatforge_rotary_bf16(uint16_t *x, int rows, int heads, int D, long sxr, long sxh, const uint16_t *cos,
                           const uint16_t *sin) {
  int half = D / 2;
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < heads; ++h) {
      uint16_t *xh = x + r * sxr + h * sxh;
      const uint16_t *c = cos + (size_t)r * D, *s = sin + (size_t)r * D;
      for (int i = 0; i < half; i += 16) {
        __m512 lo = load16(xh + i), hi = load16(xh + half + i);
        __m512 a = _mm512_add_ps(round16(_mm512_mul_ps(lo, load16(c + i))),
                                 round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi), load16(s + i))));
        __m512 b = _mm512_add_ps(round16(_mm512_mul_ps(hi, load16(c + half + i))),
                                 round16(_mm512_mul_ps(lo, load16(s + half + i))));
        store16(xh + i, a);
        store16(xh + half + i, b);
      }
    }
}
