/* CPU kernels for the packed float32 path, built on first use by cpu_kernels.py.
 *
 * Plain C with OpenMP and no torch headers, so the build takes a fraction of a second. The
 * caller checks shapes, dtypes and layouts; these functions trust them.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

/* The native vector, used by every kernel below: 16 floats with AVX-512, 8 with AVX, 4 else
 * (SSE, NEON). GNU C vectors, so one source builds for each. */
#if defined(__AVX512F__)
#define VEC_FLOATS 16
#elif defined(__AVX__)
#define VEC_FLOATS 8
#else
#define VEC_FLOATS 4
#endif

typedef float vec __attribute__((vector_size(VEC_FLOATS * 4)));
typedef float vec_u __attribute__((vector_size(VEC_FLOATS * 4), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(VEC_FLOATS * 4)));

/* The sum of a vector's lanes, by halves (log2 of the width shuffles and adds). */
static inline float lane_sum(vec v) {
#if VEC_FLOATS == 16
    v += __builtin_shuffle(v, (ivec){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
#endif
#if VEC_FLOATS >= 8
    v += __builtin_shuffle(v, (ivec){4, 5, 6, 7, 0, 1, 2, 3
#if VEC_FLOATS == 16
                                     , 12, 13, 14, 15, 8, 9, 10, 11
#endif
                                     });
#endif
    return v[0] + v[1] + v[2] + v[3];
}

/* e^x for x <= 0, a vector at a time (gcc does not vectorise expf): Cephes' expf, a degree-6
 * polynomial after splitting off k ln 2, within 2 ulps; below -87 (and at -inf) exactly 0. */

static inline vec exp_nonpositive(vec x) {
    const ivec dead = x < -87.f;  /* lanes of -1 where e^x is taken as 0 */
    const vec clamped = (vec)(((ivec)x & ~dead) | ((ivec)((vec){0} - 87.f) & dead));
    /* k = round(x / ln 2): adding and taking away 1.5 * 2^23 rounds to an integer */
    const vec k = (clamped * 1.44269504088896341f + 12582912.f) - 12582912.f;
    const vec r = clamped - k * 0.693359375f + k * 2.12194440e-4f;
    vec p = (vec){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const vec two_to_k = (vec)((__builtin_convertvector(k, ivec) + 127) << 23);
    return (vec)((ivec)(p * two_to_k) & ~dead);
}

/* The same for one value (the vector's first lane), so scalar tails round alike. */
static inline float exp_nonpositive1(float x) { return exp_nonpositive((vec){0} + x)[0]; }

/* s[j] = e^(s[j] - top) for j < n (top >= every s[j]); returns their sum. */
static float exp_in_place(float* s, int64_t n, float top) {
    vec sum = {0};
    int64_t j = 0;
    for (; j + VEC_FLOATS <= n; j += VEC_FLOATS) {
        const vec e = exp_nonpositive(*(vec_u*)(s + j) - top);
        *(vec_u*)(s + j) = e;
        sum += e;
    }
    float total = lane_sum(sum);
    for (; j < n; ++j) {
        s[j] = exp_nonpositive1(s[j] - top);
        total += s[j];
    }
    return total;
}

/* Prefetch distance in keys, into L2 (prefetch_row): 16-24 keys ahead took attention at 64
 * rows from 6.2 to 5.1-5.2 ms (8 layers, 160 keys, caches cold) where 8 keys into L1 had been
 * as good as any distance into L1; 32-64 into L2 were slower. */
#ifndef PREFETCH_KEYS
#define PREFETCH_KEYS 16
#endif
#ifndef NEXT_KEYS
#define NEXT_KEYS 16 /* keys of the next work item prefetched: 8-32 measured alike */
#endif

static inline void prefetch_row(const float* row, int64_t head_dim) {
    for (int64_t d = 0; d < head_dim; d += 16) __builtin_prefetch(row + d, 0, 2);
}

/* One (row, kv head) of decode attention with head_dim = n_vecs vectors and `groups` queries
 * (both constants after inlining, groups * n_vecs <= 8): the queries' vectors and the outputs'
 * accumulators stay in registers, and one pass over the keys scores every query (a key costs
 * n_vecs loads, groups * n_vecs multiply-adds and groups lane sums), one over the values
 * accumulates every output. The generic loop below kept the outputs in memory. */
static inline __attribute__((always_inline)) void attend_one(
    const float* qs, const float* keys, const float* values, float* os, float* scores,
    int64_t n_keys, float scale, int groups, int n_vecs) {
    const int64_t head_dim = n_vecs * VEC_FLOATS;
    vec qv[8];
    for (int g = 0; g < groups; ++g)
        for (int v = 0; v < n_vecs; ++v)
            qv[g * n_vecs + v] = *(const vec_u*)(qs + g * head_dim + v * VEC_FLOATS) * scale;
    float top[8];
    for (int g = 0; g < groups; ++g) top[g] = -INFINITY;
    for (int64_t j = 0; j < n_keys; ++j) {
        const float* key = keys + j * head_dim;
        if (j + PREFETCH_KEYS < n_keys) prefetch_row(key + PREFETCH_KEYS * head_dim, head_dim);
        vec kv[8];
        for (int v = 0; v < n_vecs; ++v) kv[v] = *(const vec_u*)(key + v * VEC_FLOATS);
        for (int g = 0; g < groups; ++g) {
            vec acc = qv[g * n_vecs] * kv[0];
            for (int v = 1; v < n_vecs; ++v) acc += qv[g * n_vecs + v] * kv[v];
            const float score = lane_sum(acc);
            scores[g * n_keys + j] = score;
            top[g] = score > top[g] ? score : top[g];
        }
    }
    float inv[8];
    for (int g = 0; g < groups; ++g) {
        const float total = exp_in_place(scores + g * n_keys, n_keys, top[g]);
        inv[g] = n_keys > 0 ? 1.f / total : 0.f;
    }
    vec ov[8];
    for (int i = 0; i < groups * n_vecs; ++i) ov[i] = (vec){0};
    for (int64_t j = 0; j < n_keys; ++j) {
        const float* value = values + j * head_dim;
        if (j + PREFETCH_KEYS < n_keys) prefetch_row(value + PREFETCH_KEYS * head_dim, head_dim);
        for (int v = 0; v < n_vecs; ++v) {
            const vec val = *(const vec_u*)(value + v * VEC_FLOATS);
            for (int g = 0; g < groups; ++g) ov[g * n_vecs + v] += scores[g * n_keys + j] * val;
        }
    }
    for (int g = 0; g < groups; ++g)
        for (int v = 0; v < n_vecs; ++v)
            *(vec_u*)(os + g * head_dim + v * VEC_FLOATS) = ov[g * n_vecs + v] * inv[g];
}

/* Decode attention: one query token per row against the first lens[r] keys of its slot.
 *
 * q and out: (n_rows, n_kv_heads * group, head_dim), contiguous; query head h reads kv head
 * h / group. k_cache / v_cache: (n_slots, n_kv_heads, max_len, head_dim), contiguous, so one
 * slot's keys for one head are a contiguous (len, head_dim) matrix. Each (row, kv head) pair is
 * one work item, so K and V are read from memory once for its `group` queries. Head sizes of 4
 * or 8 vectors take attend_one (the bench model's 64 and Llama's 128 on AVX-512); others a
 * generic loop whose queries share one pass over the keys and one over the values. The
 * softmax's exponentials are vectorised (exp_in_place). `workspace` is the caller's scratch space,
 * n_threads * group * longest floats, longest (<= max_len) being the largest of `lens`.
 * Returns 0, or 1 + the first row whose slot or length is out of range (then nothing is done).
 */
int64_t decode_attention(const float* q, const float* k_cache, const float* v_cache, float* out,
                         const int64_t* slots, const int64_t* lens, int64_t n_rows,
                         int64_t n_slots, int64_t n_kv_heads, int64_t group, int64_t head_dim,
                         int64_t max_len, int64_t longest, float scale, float* workspace,
                         int n_threads) {
    const int64_t head_stride = max_len * head_dim;
    const int64_t slot_stride = n_kv_heads * head_stride;
    for (int64_t r = 0; r < n_rows; ++r)  /* nothing is read outside the pool */
        if (slots[r] < 0 || slots[r] >= n_slots || lens[r] < 0 || lens[r] > longest) return r + 1;
    #pragma omp parallel num_threads(n_threads)
    {
        float* scores = workspace + omp_get_thread_num() * group * longest;
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < n_rows * n_kv_heads; ++item) {
            const int64_t row = item / n_kv_heads, head = item % n_kv_heads;
            const int64_t n_keys = lens[row];
            const int64_t offset = slots[row] * slot_stride + head * head_stride;
            const float* keys = k_cache + offset;
            const float* values = v_cache + offset;
            const float* qs = q + (row * n_kv_heads + head) * group * head_dim;
            float* os = out + (row * n_kv_heads + head) * group * head_dim;
            if (item + 1 < n_rows * n_kv_heads) {
                /* The next item's first keys and values, which the hardware prefetcher would
                 * only find after a few misses (another slot, far away in the pool). */
                const int64_t next = item + 1, next_row = next / n_kv_heads;
                const int64_t next_offset = slots[next_row] * slot_stride
                                            + (next % n_kv_heads) * head_stride;
                const int64_t first = lens[next_row] < NEXT_KEYS ? lens[next_row] : NEXT_KEYS;
                for (int64_t j = 0; j < first; ++j) {
                    prefetch_row(k_cache + next_offset + j * head_dim, head_dim);
                    prefetch_row(v_cache + next_offset + j * head_dim, head_dim);
                }
            }
            if (head_dim == 4 * VEC_FLOATS || head_dim == 8 * VEC_FLOATS) {
                /* Register tiles of at most 8 vectors: two queries of 4, or one of 8. */
                for (int64_t g = 0; g < group;) {
                    const float* qg = qs + g * head_dim;
                    float* og = os + g * head_dim;
                    if (head_dim == 8 * VEC_FLOATS) {
                        attend_one(qg, keys, values, og, scores, n_keys, scale, 1, 8);
                        g += 1;
                    } else if (g + 1 < group) {
                        attend_one(qg, keys, values, og, scores, n_keys, scale, 2, 4);
                        g += 2;
                    } else {
                        attend_one(qg, keys, values, og, scores, n_keys, scale, 1, 4);
                        g += 1;
                    }
                }
                continue;
            }
            for (int64_t j = 0; j < n_keys; ++j) {
                const float* key = keys + j * head_dim;
                if (j + PREFETCH_KEYS < n_keys) prefetch_row(key + PREFETCH_KEYS * head_dim, head_dim);
                for (int64_t g = 0; g < group; ++g) {
                    const float* qg = qs + g * head_dim;
                    float dot = 0.f;
                    #pragma omp simd reduction(+:dot)
                    for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * key[d];
                    scores[g * n_keys + j] = dot * scale;
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                float* s = scores + g * n_keys;
                float top = -INFINITY;
                for (int64_t j = 0; j < n_keys; ++j) top = s[j] > top ? s[j] : top;
                const float total = exp_in_place(s, n_keys, top);
                const float inv = n_keys > 0 ? 1.f / total : 0.f;
                for (int64_t j = 0; j < n_keys; ++j) s[j] *= inv;
                float* og = os + g * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) og[d] = 0.f;
            }
            for (int64_t j = 0; j < n_keys; ++j) {
                const float* value = values + j * head_dim;
                if (j + PREFETCH_KEYS < n_keys) prefetch_row(value + PREFETCH_KEYS * head_dim, head_dim);
                for (int64_t g = 0; g < group; ++g) {
                    const float p = scores[g * n_keys + j];
                    float* og = os + g * head_dim;
                    #pragma omp simd
                    for (int64_t d = 0; d < head_dim; ++d) og[d] += p * value[d];
                }
            }
        }
    }
    return 0;
}

/* RMSNorm of each row, after adding `delta` when it is not NULL:
 *   h = x + delta (stored in `sum`), out = h * rsqrt(mean(h^2) + eps) * weight.
 * Rows of x, delta, sum and out are `dim` floats apart from each other's start by their own
 * strides (x may be a strided view); one pass over each row instead of torch's separate add,
 * square, mean, rsqrt and two products. The mean of squares is summed in double: it is one
 * value per row, and rounding there is what would move the result most.
 */
void add_rms_norm(const float* x, int64_t x_stride, const float* delta, int64_t delta_stride,
                  float* sum, float* out, const float* weight, int64_t n_rows, int64_t dim,
                  float eps, int n_threads) {
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_rows > 4)
    for (int64_t r = 0; r < n_rows; ++r) {
        const float* xr = x + r * x_stride;
        float* h = delta ? sum + r * dim : (float*)xr;
        if (delta) {
            const float* dr = delta + r * delta_stride;
            #pragma omp simd
            for (int64_t d = 0; d < dim; ++d) h[d] = xr[d] + dr[d];
        }
        double squares = 0.0;
        #pragma omp simd reduction(+:squares)
        for (int64_t d = 0; d < dim; ++d) squares += (double)h[d] * h[d];
        const float inv = (float)(1.0 / sqrt(squares / dim + eps));
        float* o = out + r * dim;
        #pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = h[d] * inv * weight[d];
    }
}

/* Rotary embedding of the q and k heads, and K/V into the cache, for every token of a step.
 *
 * qkv: (n_tokens, n_heads + 2 * n_kv_heads, head_dim), contiguous rows, as the fused q/k/v
 * projection returns it. cos and sin: (n_tokens, head_dim), the halves repeated (the
 * "rotate half" layout: dimension i pairs with i + head_dim / 2). Token t's rotated queries go
 * to q_out (n_tokens, n_heads, head_dim); its rotated keys and its values to
 * [slots[t], :, positions[t]] of the caches (n_slots, n_kv_heads, max_len, head_dim).
 * Returns 0, or 1 + the first token whose place is outside the pool (then nothing is done).
 * rope_store_rows reads token t's cos and sin from row angle_rows[t] of tables instead (NULL:
 * row t), as the decode step does from per-position tables.
 */
static int64_t rope_store_rows(const float* qkv, const float* cos, const float* sin,
                               const int64_t* angle_rows, float* q_out, float* k_cache,
                               float* v_cache, const int64_t* slots, const int64_t* positions,
                               int64_t n_tokens, int64_t n_heads, int64_t n_slots,
                               int64_t n_kv_heads, int64_t head_dim, int64_t max_len,
                               int n_threads) {
    const int64_t half = head_dim / 2, row = (n_heads + 2 * n_kv_heads) * head_dim;
    for (int64_t t = 0; t < n_tokens; ++t)
        if (slots[t] < 0 || slots[t] >= n_slots || positions[t] < 0 || positions[t] >= max_len)
            return t + 1;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_tokens > 4)
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float* src = qkv + t * row;
        const int64_t angles = (angle_rows ? angle_rows[t] : t) * head_dim;
        const float* c = cos + angles;
        const float* s = sin + angles;
        const int64_t cache_row = (slots[t] * n_kv_heads * max_len + positions[t]) * head_dim;
        for (int64_t h = 0; h < n_heads + n_kv_heads; ++h) {
            const float* x = src + h * head_dim;
            float* dst = h < n_heads ? q_out + (t * n_heads + h) * head_dim
                                     : k_cache + cache_row + (h - n_heads) * max_len * head_dim;
            #pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                dst[i] = x[i] * c[i] - x[i + half] * s[i];
                dst[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
            }
        }
        for (int64_t h = 0; h < n_kv_heads; ++h) {
            const float* x = src + (n_heads + n_kv_heads + h) * head_dim;
            float* dst = v_cache + cache_row + h * max_len * head_dim;
            for (int64_t i = 0; i < head_dim; ++i) dst[i] = x[i];
        }
    }
    return 0;
}

int64_t rope_store(const float* qkv, const float* cos, const float* sin, float* q_out,
                   float* k_cache, float* v_cache, const int64_t* slots,
                   const int64_t* positions, int64_t n_tokens, int64_t n_heads,
                   int64_t n_slots, int64_t n_kv_heads, int64_t head_dim, int64_t max_len,
                   int n_threads) {
    return rope_store_rows(qkv, cos, sin, NULL, q_out, k_cache, v_cache, slots, positions,
                           n_tokens, n_heads, n_slots, n_kv_heads, head_dim, max_len,
                           n_threads);
}

/* Linear layer y = x W^T, for any number of rows.
 *
 * pack_linear_weight lays W (n_out, n_in) out once as panels of LINEAR_PANEL (P) outputs:
 * panel p is W[p * P : p * P + P, :] transposed, (n_in, P), zero past n_out. A tile of rows
 * keeps its vector accumulators in registers while it reads its panel (or two adjacent ones)
 * from start to end, P weights a step, each multiplied by one broadcast x value per row. The
 * weights are read in the order they lie in memory, once per tile, so a decode step (a few
 * rows) runs at the machine's read bandwidth, where oneDNN's kernels for so few rows do not;
 * with more rows the panel, read again for each tile, comes from cache.
 */
/* Two native vectors per panel row; as many rows per tile as keep the 2 x rows accumulators,
 * two weight vectors and a broadcast x in registers. Only the AVX-512 build was measured
 * faster than oneDNN at every row count (the AVX2 one, on the same CPU, lost at 4-16 rows to
 * oneDNN's AVX-512 kernels): linear_is_tuned tells the caller which to use.
 *
 * Past WIDE_AFTER rows (AVX-512 only) the tiles are 6 rows by two panels: each weight vector
 * then feeds 6 multiply-adds and each broadcast x value 4. On 1B-shaped linears at 64-256
 * rows that matched or beat oneDNN, where 12 x 1 panel tiles were 7-12% slower; at 16 rows
 * and below the 12 x 1 tiles were faster. Below WIDE_BELOW rows too: one row of a one-panel
 * tile is two chains of dependent multiply-adds, which their latency holds below the memory's
 * pace; two panels make four. A decode step's linears (bench model, out of cache, one process)
 * at 1 / 2 / 3 rows: 5.88 / 4.26 / 3.99 ms -> 5.30 / 4.03 / 4.07 ms. Each output's sum runs in
 * the same order either way, so results do not depend on the tile. */
#define LINEAR_PANEL (2 * VEC_FLOATS)
/* Panel rows read ahead by software prefetch, beside the hardware prefetcher, in tiles of more
 * than 2 rows. A bench-model step's linears (one process, the variants interleaved, AVX-512,
 * Zen 5, runs over a day whose machine changed speed): 16 rows 10-16% faster, 4 and 8 rows
 * 0-15%, 64 rows 1-4%; 1 and 2 rows gained nothing (-6..+3%) and are left to the hardware.
 * 32 and 64 rows ahead did about as well, 16 less. Into all levels (T0): non-temporal did the
 * same here, but Intel's fills L1 only, and a panel is read again from L2 by the next tile. */
#define PREFETCH_PANEL_ROWS 48
#if VEC_FLOATS == 16
#define LINEAR_ROWS 12 /* 24 + 3 of 32 registers */
#define WIDE_ROWS 6    /* 24 + 5 */
#define WIDE_AFTER 16
#define WIDE_BELOW 3
#define LINEAR_TUNED 1
#else
#define LINEAR_ROWS 6 /* AVX: 12 + 3 of 16 registers; SSE the same, NEON has 32 */
#define WIDE_ROWS 1
#define WIDE_AFTER INT64_MAX /* never */
#define WIDE_BELOW 0          /* never: the wide tiles are AVX-512 only */
#define LINEAR_TUNED 0
#endif

int64_t linear_panel_width(void) { return LINEAR_PANEL; }
int64_t linear_is_tuned(void) { return LINEAR_TUNED; }

void pack_linear_weight(const float* w, float* panels, int64_t n_out, int64_t n_in,
                        int n_threads) {
    const int64_t n_panels = (n_out + LINEAR_PANEL - 1) / LINEAR_PANEL;
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t p = 0; p < n_panels; ++p)
        for (int64_t i = 0; i < n_in; ++i)
            for (int64_t j = 0; j < LINEAR_PANEL; ++j) {
                const int64_t o = p * LINEAR_PANEL + j;
                panels[(p * n_in + i) * LINEAR_PANEL + j] = o < n_out ? w[o * n_in + i] : 0.f;
            }
}

/* The first n_cols (any, <= 0 for none) of one vector into y. */
static inline void store_columns(float* y, vec v, int64_t n_cols) {
    if (n_cols >= VEC_FLOATS) { *(vec_u*)y = v; return; }
    for (int64_t j = 0; j < n_cols; ++j) y[j] = v[j];
}

/* A row's running argmax over the columns one thread has computed, lane by lane: the largest
 * value and the first column it came at (a lane sees its columns in increasing order; equal
 * values keep the first, and the initial -inf with column INT32_MAX loses to any real -inf),
 * and whether a NaN came (the row is then searched for its first NaN, torch.argmax's answer). */
typedef struct { vec top; ivec at; ivec nan; } LaneMax;

static inline void lane_max_init(LaneMax* m) {
    m->top = (vec){0} - INFINITY;
    m->at = (ivec){0} + INT32_MAX;
    m->nan = (ivec){0};
}

/* v holds columns col .. col + VEC_FLOATS - 1, of which the first n_valid (any) exist. */
static inline void lane_max_update(LaneMax* m, vec v, int64_t col, int64_t n_valid) {
    ivec lane;
    for (int t = 0; t < VEC_FLOATS; ++t) lane[t] = t;
    const ivec valid = lane < (ivec){0} + (int32_t)(n_valid < VEC_FLOATS ? n_valid : VEC_FLOATS);
    const ivec at = lane + (int32_t)col;
    const ivec above = ((v > m->top) | ((v == m->top) & (at < m->at))) & valid;
    m->nan |= (v != v) & valid;
    m->top = (vec)(((ivec)v & above) | ((ivec)m->top & ~above));
    m->at = (at & above) | (m->at & ~above);
}

/* n_rows rows of x times n_vecs / 2 adjacent panels (n_vecs 2 or 4), into the n_cols columns
 * of y they cover (fewer in the last panel), starting at column col of the output. Both counts
 * are constants after inlining, so the accumulators live in registers. With `maxes` (one per
 * row), each row's running argmax takes the tile's values from the registers too. */
static inline __attribute__((always_inline)) void linear_tile(
    const float* x, int64_t x_stride, const float* panel, int64_t n_in, float* y,
    int64_t y_stride, int n_rows, int n_vecs, int64_t n_cols, LaneMax* maxes, int64_t col) {
    vec acc[LINEAR_ROWS][4];
    for (int r = 0; r < n_rows; ++r)
        for (int v = 0; v < n_vecs; ++v) acc[r][v] = (vec){0};
    for (int64_t i = 0; i < n_in; ++i) {
        if (n_rows > 2 && i + PREFETCH_PANEL_ROWS < n_in)  /* n_rows: a constant here */
            for (int v = 0; v < n_vecs; v += 2) {  /* a panel row: 2 vectors */
                const float* ahead = panel + (v / 2) * n_in * LINEAR_PANEL
                                     + (i + PREFETCH_PANEL_ROWS) * LINEAR_PANEL;
                __builtin_prefetch(ahead, 0, 3);
                __builtin_prefetch(ahead + VEC_FLOATS, 0, 3);
            }
        vec w[4];
        for (int v = 0; v < n_vecs; ++v)  /* panel v / 2, its half v % 2 */
            w[v] = *(const vec_u*)(panel + (v / 2) * n_in * LINEAR_PANEL + i * LINEAR_PANEL
                                   + (v % 2) * VEC_FLOATS);
        for (int r = 0; r < n_rows; ++r) {
            const float xr = x[r * x_stride + i];
            for (int v = 0; v < n_vecs; ++v) acc[r][v] += xr * w[v];
        }
    }
    for (int r = 0; r < n_rows; ++r)
        for (int v = 0; v < n_vecs; ++v)
            store_columns(y + r * y_stride + v * VEC_FLOATS, acc[r][v], n_cols - v * VEC_FLOATS);
    if (maxes)
        for (int r = 0; r < n_rows; ++r)
            for (int v = 0; v < n_vecs; ++v)
                lane_max_update(&maxes[r], acc[r][v], col + v * VEC_FLOATS,
                                n_cols - v * VEC_FLOATS);
}

#define TILE(rows, vecs) \
    case rows: \
        linear_tile(xt, x_stride, panel, n_in, yt, n_out, rows, vecs, n_cols, \
                    maxes ? maxes + first : NULL, p * LINEAR_PANEL); \
        break;

/* Scratch bytes linear_argmax needs: a LaneMax per row for each thread. */
int64_t linear_argmax_scratch_bytes(int64_t n_rows, int n_threads) {
    return (int64_t)sizeof(LaneMax) * n_rows * (n_threads > 0 ? n_threads : 1);
}

static void linear_impl(const float* x, int64_t x_stride, const float* panels, float* y,
                        int64_t n_rows, int64_t n_in, int64_t n_out, int n_threads,
                        LaneMax* scratch);

/* x: (n_rows, n_in), rows x_stride floats apart; y: (n_rows, n_out), contiguous. */
void linear(const float* x, int64_t x_stride, const float* panels, float* y, int64_t n_rows,
            int64_t n_in, int64_t n_out, int n_threads) {
    linear_impl(x, x_stride, panels, y, n_rows, n_in, n_out, n_threads, NULL);
}

/* linear, and each row's torch.argmax (the first of equal values, the first NaN if any) into
 * argmax_out, kept from the accumulators as the tiles finish: the greedy tokens of an lm_head
 * without reading its logits back (after the lm_head's weights have streamed through the
 * caches, a separate argmax_rows read them from memory: 0.1 ms of a 9 ms bench-model step).
 * scratch: linear_argmax_scratch_bytes(n_rows, n_threads), any alignment of a LaneMax. */
void linear_argmax(const float* x, int64_t x_stride, const float* panels, float* y,
                   int64_t n_rows, int64_t n_in, int64_t n_out, int n_threads,
                   int64_t* argmax_out, void* scratch) {
    LaneMax* maxes = (LaneMax*)scratch;
    const int n_slots = n_threads > 0 ? n_threads : 1;
    for (int64_t i = 0; i < (int64_t)n_slots * n_rows; ++i) lane_max_init(&maxes[i]);
    linear_impl(x, x_stride, panels, y, n_rows, n_in, n_out, n_slots, maxes);
    for (int64_t r = 0; r < n_rows; ++r) {
        float best = -INFINITY;
        int32_t best_at = INT32_MAX;
        int any_nan = 0;
        for (int t = 0; t < n_slots; ++t) {
            const LaneMax* m = &maxes[(int64_t)t * n_rows + r];
            for (int lane = 0; lane < VEC_FLOATS; ++lane) {
                any_nan |= m->nan[lane];
                if (m->top[lane] > best || (m->top[lane] == best && m->at[lane] < best_at)) {
                    best = m->top[lane];
                    best_at = m->at[lane];
                }
            }
        }
        if (any_nan) {
            const float* row = y + r * n_out;
            for (int64_t k = 0; k < n_out; ++k)
                if (row[k] != row[k]) { best_at = (int32_t)k; break; }
        }
        argmax_out[r] = best_at == INT32_MAX ? 0 : best_at;
    }
}

static void linear_impl(const float* x, int64_t x_stride, const float* panels, float* y,
                        int64_t n_rows, int64_t n_in, int64_t n_out, int n_threads,
                        LaneMax* scratch) {
    const int64_t n_panels = (n_out + LINEAR_PANEL - 1) / LINEAR_PANEL;
    /* Panels per tile, and rows per tile at most: then rows split evenly into tiles (16 rows:
     * 8 + 8, not 12 + 4). */
    const int64_t wide = n_rows > WIDE_AFTER || n_rows < WIDE_BELOW ? 2 : 1;
    const int64_t most = wide == 2 ? WIDE_ROWS : LINEAR_ROWS;
    const int64_t n_tiles = (n_rows + most - 1) / most;
    const int64_t tile_rows = n_tiles ? (n_rows + n_tiles - 1) / n_tiles : 0;
    const int64_t n_groups = (n_panels + wide - 1) / wide;
    /* Panel-major: one thread's consecutive items share panels, which stay in its cache. */
    #pragma omp parallel num_threads(n_threads)
    {
    LaneMax* maxes = scratch ? scratch + (int64_t)omp_get_thread_num() * n_rows : NULL;
    #pragma omp for schedule(static)
    for (int64_t item = 0; item < n_groups * n_tiles; ++item) {
        const int64_t p = item / n_tiles * wide, first = (item % n_tiles) * tile_rows;
        const int64_t rows = n_rows - first < tile_rows ? n_rows - first : tile_rows;
        const int64_t n_cols = n_out - p * LINEAR_PANEL;  /* the store clips it */
        const float* panel = panels + p * n_in * LINEAR_PANEL;
        const float* xt = x + first * x_stride;
        float* yt = y + first * n_out + p * LINEAR_PANEL;
        if (wide == 2 && p + 1 < n_panels) {
            switch (rows) {
#if LINEAR_TUNED
                TILE(1, 4) TILE(2, 4) TILE(3, 4) TILE(4, 4) TILE(5, 4) TILE(6, 4)
#endif
            }
            continue;
        }
        switch (rows) {  /* one panel: narrow tiles, or a wide tile's odd last panel */
            TILE(1, 2) TILE(2, 2) TILE(3, 2) TILE(4, 2) TILE(5, 2) TILE(6, 2)
#if LINEAR_ROWS > 6
            TILE(7, 2) TILE(8, 2) TILE(9, 2) TILE(10, 2) TILE(11, 2) TILE(12, 2)
#endif
        }
    }
    }
}

#define SAMPLE_BLOCK 128 /* tokens per block of the two-level search, as in sampling.py */

int64_t sample_block(void) { return SAMPLE_BLOCK; }

/* Sum of e^((row[j] - top) * scale) over [begin, end), in float: a block's mass. */
static float block_mass(const float* row, int64_t begin, int64_t end, float top, float scale) {
    vec sum = {0};
    int64_t j = begin;
    for (; j + VEC_FLOATS <= end; j += VEC_FLOATS)
        sum += exp_nonpositive((*(const vec_u*)(row + j) - top) * scale);
    if (j < end) {  /* the vocabulary's last, partial vector: the rest of it counts 0 */
        vec tail = (vec){0} - INFINITY;
        for (int64_t t = 0; j + t < end; ++t) tail[t] = (row[j + t] - top) * scale;
        sum += exp_nonpositive(tail);
    }
    return lane_sum(sum);
}

static float row_max(const float* restrict row, int64_t n) {
    float top = -INFINITY;
    #pragma omp simd reduction(max:top)
    for (int64_t j = 0; j < n; ++j) top = row[j] > top ? row[j] : top;
    return top;
}

static int64_t sample_row(const float* restrict row, int64_t vocab, float scale, double uniform,
                          double* restrict mass) {
    const int64_t n_blocks = (vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    const float top = row_max(row, vocab);
    if (!(top > -INFINITY && top < INFINITY)) return 0;  /* no distribution */
    double total = 0.0;
    for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t end = (b + 1) * SAMPLE_BLOCK < vocab ? (b + 1) * SAMPLE_BLOCK : vocab;
        mass[b] = block_mass(row, b * SAMPLE_BLOCK, end, top, scale);
        total += mass[b];
    }
    /* Strictly below the total: the first cumulative mass past it exists. */
    double target = uniform * total;
    if (target >= total) target = nextafter(total, 0.0);
    int64_t block = n_blocks - 1;
    double before = 0.0;
    for (int64_t b = 0; b < n_blocks; ++b) {
        if (before + mass[b] > target) { block = b; break; }
        before += mass[b];
    }
    if (block == n_blocks - 1 && before + mass[block] <= target) before = total - mass[block];
    /* Inside the block, in order; rounding can leave the target past the block's last token
     * with mass: then that token. */
    const double rest = target - before > 0.0 ? target - before : 0.0;
    const int64_t end = (block + 1) * SAMPLE_BLOCK < vocab ? (block + 1) * SAMPLE_BLOCK : vocab;
    double seen = 0.0;
    int64_t last = -1;
    for (int64_t j = block * SAMPLE_BLOCK; j < end; ++j) {
        const float e = exp_nonpositive1((row[j] - top) * scale);
        if (e <= 0.f) continue;
        last = j;
        seen += e;
        if (seen > rest) break;
    }
    return last >= 0 ? last : 0;
}

/* One token per row, drawn from softmax(logits[r] * inv_temperature[r]) by inverting the CDF at
 * uniforms[r] in [0, 1): the sampler's two-level search (server/sampling.py) in one pass per
 * row. Block masses (blocks of 128 tokens) go into `workspace` (n_rows x ceil(vocab / 128)
 * doubles); the chosen block is scanned again. A token of probability 0 (a -inf logit) is never
 * drawn. A row without a distribution gets some token in range: token 0 when every logit is
 * -inf, a meaningless one when some are NaN. */
void sample_rows(const float* logits, const float* inv_temperature, const double* uniforms,
                 int64_t* out, double* workspace, int64_t n_rows, int64_t vocab,
                 int n_threads) {
    const int64_t n_blocks = (vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_rows > 1)
    for (int64_t r = 0; r < n_rows; ++r)
        out[r] = sample_row(logits + r * vocab, vocab, inv_temperature[r], uniforms[r],
                            workspace + r * n_blocks);
}

/* Index of the largest value of a row, the first of equal ones; a NaN counts as the largest
 * (the first NaN): torch.argmax's answer. One pass: each lane keeps its largest value and where
 * it first saw it, then the lanes' ties go to the lowest index. */
static int64_t argmax_row(const float* restrict row, int64_t n) {
    vec top = (vec){0} - INFINITY;
    ivec at = {0}, nan = {0};
    for (int t = 0; t < VEC_FLOATS; ++t) at[t] = t;
    ivec where = at;
    int64_t j = 0;
    for (; j + VEC_FLOATS <= n; j += VEC_FLOATS, at += VEC_FLOATS) {
        const vec v = *(const vec_u*)(row + j);
        const ivec above = v > top;
        nan |= v != v;
        top = (vec)(((ivec)v & above) | ((ivec)top & ~above));
        where = (at & above) | (where & ~above);
    }
    int any_nan = 0;
    for (int t = 0; t < VEC_FLOATS; ++t) any_nan |= nan[t];
    for (int64_t k = j; k < n; ++k) any_nan |= row[k] != row[k];
    if (any_nan) {
        for (int64_t k = 0; k < n; ++k)
            if (row[k] != row[k]) return k;
    }
    /* A lane that never rose above -inf keeps its first index, which is right: the first of
     * its -inf values. With no whole vector (j == 0) every lane is -inf at its lane index and
     * lane 0 wins the ties, so the tail below starts from row 0 at -inf. */
    float best = top[0];
    int64_t best_at = where[0];
    for (int t = 1; t < VEC_FLOATS; ++t)
        if (top[t] > best || (top[t] == best && where[t] < best_at)) {
            best = top[t];
            best_at = where[t];
        }
    for (int64_t k = j; k < n; ++k)
        if (row[k] > best) best = row[k], best_at = k;
    return best_at;
}

/* torch.argmax(logits, dim=-1) of each row (n_rows x vocab): 16 rows of 32000 in a few
 * microseconds each, where PyTorch's reduction took 0.25-0.3 ms for the batch. */
void argmax_rows(const float* logits, int64_t* out, int64_t n_rows, int64_t vocab,
                 int n_threads) {
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_rows >= 8)
    for (int64_t r = 0; r < n_rows; ++r) out[r] = argmax_row(logits + r * vocab, vocab);
}

/* silu(g) = g * sigmoid(g), with e^-|g| (never positive) from exp_nonpositive:
 * sigmoid(g) = 1 / (1 + e^-g) for g >= 0 and e^g / (1 + e^g) below, so no e^x overflows. */
static inline vec silu(vec g) {
    const ivec negative = g < 0.f;
    const vec e = exp_nonpositive((vec)((ivec)g | ((ivec){0} + INT32_MIN)));  /* e^-|g| */
    const vec above = (vec)(((ivec)e & negative) | ((ivec)((vec){0} + 1.f) & ~negative));
    return g * (above / (1.f + e));
}

/* silu(gate) * up, row by row: gate_up (n_rows, 2 * hidden) holds gate then up, as the fused
 * gate/up projection returns them; out (n_rows, hidden), contiguous. */
void silu_mul(const float* gate_up, float* out, int64_t n_rows, int64_t hidden, int n_threads) {
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_rows * hidden > 65536)
    for (int64_t r = 0; r < n_rows; ++r) {
        const float* gate = gate_up + r * 2 * hidden;
        const float* up = gate + hidden;
        float* o = out + r * hidden;
        int64_t i = 0;
        for (; i + VEC_FLOATS <= hidden; i += VEC_FLOATS)
            *(vec_u*)(o + i) = silu(*(const vec_u*)(gate + i)) * *(const vec_u*)(up + i);
        for (; i < hidden; ++i) o[i] = silu((vec){0} + gate[i])[0] * up[i];
    }
}

/* One decoder layer's weights (the linears packed by pack_linear_weight) and KV caches. */
typedef struct {
    const float *input_norm, *qkv, *o, *post_norm, *gate_up, *down;
    float *k_cache, *v_cache; /* (n_slots, n_kv_heads, max_len, head_dim) */
} DecodeLayer;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, n_slots, max_len, vocab;
    float eps, scale; /* RMSNorm's epsilon; attention's 1 / sqrt(head_dim) */
} DecodeShape;

typedef struct {
    const float* embed;       /* (vocab, dim) */
    const float* final_norm;  /* (dim,) */
    const float *cos, *sin;   /* (max_len, head_dim): position p's angles in row p */
} DecodeTables;

/* The floats of decode_layers' scratch space for n_rows rows. */
int64_t decode_scratch_floats(const DecodeShape* s, int64_t n_rows, int64_t longest,
                              int n_threads) {
    const int64_t qkv = (s->n_heads + 2 * s->n_kv_heads) * s->head_dim;
    const int64_t group = s->n_heads / s->n_kv_heads;
    return n_rows * (5 * s->dim + qkv + 2 * s->n_heads * s->head_dim + 3 * s->hidden)
           + n_threads * group * (longest > 0 ? longest : 1);
}

/* The embedding, decoder layers and final norm of a decode step, in one call: what the model's
 * forward runs kernel by kernel from Python (the same kernels, in the same order), without
 * going back to the interpreter between them. Row r is token token_ids[r] at positions[r] of
 * slot slots[r], attending to the first lens[r] keys (longest = their maximum); out (n_rows,
 * dim): the final norm's output. scratch: decode_scratch_floats() floats. Returns 0, or 1 + the
 * first row whose token, slot, position or length is outside the model or the pool (checked
 * before the first layer stores anything: then nothing is done). */
int64_t decode_layers(const DecodeLayer* layers, const DecodeShape* s, const DecodeTables* t,
                      const int64_t* token_ids, float* out, const int64_t* slots,
                      const int64_t* positions, const int64_t* lens, int64_t longest,
                      int64_t n_rows, float* scratch, int n_threads) {
    const int64_t dim = s->dim, hd = s->head_dim, attn_dim = s->n_heads * hd;
    const int64_t qkv_dim = (s->n_heads + 2 * s->n_kv_heads) * hd;
    if (longest > s->max_len) return 1;
    for (int64_t r = 0; r < n_rows; ++r)  /* rope_store checks slots and positions */
        if (lens[r] < 0 || lens[r] > longest || token_ids[r] < 0 || token_ids[r] >= s->vocab)
            return r + 1;
    /* The residual stream is residual + delta; it starts as the embeddings (read, never
     * written), then lives in two buffers in turn: add_rms_norm writes residual + delta to
     * the one the residual is not in. */
    float* const x = scratch;
    for (int64_t r = 0; r < n_rows; ++r)
        memcpy(x + r * dim, t->embed + token_ids[r] * dim, dim * sizeof(float));
    const float* residual = x;
    float* const sums[2] = {x + n_rows * dim, x + 2 * n_rows * dim};
    float* summed = sums[0];
    float* delta = sums[1] + n_rows * dim;
    float* normed = delta + n_rows * dim;
    float* qkv = normed + n_rows * dim;
    float* q = qkv + n_rows * qkv_dim;
    float* attn = q + n_rows * attn_dim;
    float* gate_up = attn + n_rows * attn_dim;  /* 2 * hidden a row */
    float* act = gate_up + n_rows * 2 * s->hidden;
    float* workspace = act + n_rows * s->hidden;
    for (int64_t l = 0; l < s->n_layers; ++l) {
        const DecodeLayer* L = layers + l;
        if (l == 0) {
            add_rms_norm(residual, dim, NULL, 0, NULL, normed, L->input_norm, n_rows, dim,
                         s->eps, n_threads);
        } else {
            add_rms_norm(residual, dim, delta, dim, summed, normed, L->input_norm, n_rows, dim,
                         s->eps, n_threads);
            residual = summed;
            summed = summed == sums[0] ? sums[1] : sums[0];
        }
        linear(normed, dim, L->qkv, qkv, n_rows, dim, qkv_dim, n_threads);
        const int64_t bad = rope_store_rows(qkv, t->cos, t->sin, positions, q, L->k_cache,
                                            L->v_cache, slots, positions, n_rows, s->n_heads,
                                            s->n_slots, s->n_kv_heads, hd, s->max_len,
                                            n_threads);
        if (bad) return bad;
        decode_attention(q, L->k_cache, L->v_cache, attn, slots, lens, n_rows, s->n_slots,
                         s->n_kv_heads, s->n_heads / s->n_kv_heads, hd, s->max_len, longest,
                         s->scale, workspace, n_threads);
        linear(attn, attn_dim, L->o, delta, n_rows, attn_dim, dim, n_threads);
        add_rms_norm(residual, dim, delta, dim, summed, normed, L->post_norm, n_rows, dim,
                     s->eps, n_threads);
        residual = summed;
        summed = summed == sums[0] ? sums[1] : sums[0];
        linear(normed, dim, L->gate_up, gate_up, n_rows, dim, 2 * s->hidden, n_threads);
        silu_mul(gate_up, act, n_rows, s->hidden, n_threads);
        linear(act, s->hidden, L->down, delta, n_rows, s->hidden, dim, n_threads);
    }
    add_rms_norm(residual, dim, delta, dim, summed, out, t->final_norm, n_rows, dim, s->eps,
                 n_threads);
    return 0;
}
