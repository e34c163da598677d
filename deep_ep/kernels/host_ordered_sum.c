/* SPEC 5's combine sum for bf16 rows on the host: the C side of deep_ep/kernels/host_ordered_sum.py, which
 * compiles this file on first use, checks every argument and index, and documents the contract.
 *
 * out[t] = one round-to-nearest-even of the float32 sum that starts from +0.0 and adds, in this order, the
 * biases' row t, then for d = 0..R-1 the row row_index[t, d] of `rows` (of `own_rows` for d == own_column),
 * skipping -1 (adding +0.0 to a sum that started from +0.0 changes no bit). Each addition is one float32
 * rounding; the 8 or 32 lanes of a vector are 8 or 32 columns, never terms of one column, so the order per
 * column is exactly the sequential one. NaN becomes 0xffff (torch's own float32 -> bf16 conversion gives 0xffff
 * or 0x7fc0 by vector width; a summed NaN's bits are not part of the contract, docs/SEMANTICS.md).
 */
#include <stdint.h>
#include <string.h>

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

/* One AVX2 build and one baseline build, picked at load time by the CPU (x86-64 with GCC or Clang); elsewhere
 * the compiler's default vector width. */
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif

static inline float widen(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline uint16_t narrow(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0xffff;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline f32x8 widen8(const uint16_t *p) {
    u16x8 bits;
    memcpy(&bits, p, sizeof bits);
    u32x8 wide = __builtin_convertvector(bits, u32x8) << 16;
    f32x8 value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline void narrow8(f32x8 value, uint16_t *p) {
    u32x8 bits;
    memcpy(&bits, &value, sizeof bits);
    u32x8 nan = (u32x8)(value != value); /* all ones where NaN */
    u32x8 rounded = ((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16) | nan;
    u16x8 narrowed = __builtin_convertvector(rounded & 0xffffu, u16x8);
    memcpy(p, &narrowed, sizeof narrowed);
}

VECTOR_CLONES
void deep_ep_ordered_sum_bf16(const uint16_t *rows, int64_t rows_stride, const uint16_t *own_rows,
                              int64_t own_stride, int64_t own_column, const int32_t *row_index, int64_t num_sources,
                              const uint16_t *bias0, int64_t bias0_stride, const uint16_t *bias1,
                              int64_t bias1_stride, int64_t num_biases, int64_t num_tokens, int64_t hidden,
                              uint16_t *out, int64_t out_stride) {
    const uint16_t *terms[2 + num_sources];
    for (int64_t t = 0; t < num_tokens; ++t) {
        int64_t num_terms = 0;
        if (num_biases > 0) terms[num_terms++] = bias0 + t * bias0_stride;
        if (num_biases > 1) terms[num_terms++] = bias1 + t * bias1_stride;
        for (int64_t d = 0; d < num_sources; ++d) {
            int64_t row = row_index[t * num_sources + d];
            if (row < 0) continue;
            terms[num_terms++] = d == own_column ? own_rows + row * own_stride : rows + row * rows_stride;
        }
        uint16_t *target = out + t * out_stride;
        int64_t h = 0;
        for (; h + 32 <= hidden; h += 32) { /* four independent vectors: 32 columns per step */
            f32x8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t k = 0; k < num_terms; ++k) {
                a0 += widen8(terms[k] + h);
                a1 += widen8(terms[k] + h + 8);
                a2 += widen8(terms[k] + h + 16);
                a3 += widen8(terms[k] + h + 24);
            }
            narrow8(a0, target + h);
            narrow8(a1, target + h + 8);
            narrow8(a2, target + h + 16);
            narrow8(a3, target + h + 24);
        }
        for (; h < hidden; ++h) {
            float acc = 0.0f;
            for (int64_t k = 0; k < num_terms; ++k) acc += widen(terms[k][h]);
            target[h] = narrow(acc);
        }
    }
}
