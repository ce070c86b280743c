/* fuzz_input.h - reads typed values off a libFuzzer input; past its end every read is 0. */
#ifndef KVC_FUZZ_INPUT_H
#define KVC_FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
  const uint8_t *data;
  size_t size, at;
} fuzz_input_t;

static inline uint32_t fuzz_u32(fuzz_input_t *in) {
  uint32_t v = 0;
  size_t n = in->size - in->at < sizeof v ? in->size - in->at : sizeof v;
  memcpy(&v, in->data + in->at, n);
  in->at += n;
  return v;
}

static inline uint64_t fuzz_u64(fuzz_input_t *in) {
  uint64_t lo = fuzz_u32(in);
  return lo | (uint64_t)fuzz_u32(in) << 32;
}

static inline uint8_t fuzz_u8(fuzz_input_t *in) { return in->at < in->size ? in->data[in->at++] : 0; }

/* An int in [lo, hi], with a 1-in-16 chance of an arbitrary (often invalid) 32-bit value. */
static inline int32_t fuzz_int(fuzz_input_t *in, int32_t lo, int32_t hi) {
  uint8_t mode = fuzz_u8(in);
  uint32_t raw = fuzz_u32(in);
  if ((mode & 15) == 0) return (int32_t)raw;
  return lo + (int32_t)(raw % (uint32_t)(hi - lo + 1));
}

/* `value`, or (1 in 8) an int32 extreme: the values every piece of arithmetic on a field must
 * survive. */
static inline int32_t fuzz_i32_extreme(fuzz_input_t *in, int32_t value) {
  static const int32_t extremes[8] = {INT32_MIN, INT32_MIN + 1, -1, 0, 1, INT32_MAX - 1, INT32_MAX, 1 << 30};
  uint8_t mode = fuzz_u8(in);
  return (mode & 7) == 0 ? extremes[(mode >> 3) & 7] : value;
}

/* `value`, or (1 in 4) an int64 extreme: INT64_MIN / MAX and neighbours, powers of two near 2^62
 * whose byte offsets wrap, INT64_MAX / small n (products of n such values overflow), raw bits. */
static inline int64_t fuzz_i64_extreme(fuzz_input_t *in, int64_t value) {
  uint8_t mode = fuzz_u8(in);
  if ((mode & 3) != 0) return value;
  const int64_t small = (int64_t)(fuzz_u8(in) % 8);
  switch ((mode >> 2) & 15) {
    case 0: return INT64_MAX - small;
    case 1: return INT64_MIN + small;
    case 2: return -1 - small;
    case 3: return 0;
    case 4: return ((int64_t)1 << 62) + small;
    case 5: return ((int64_t)1 << 61) - small;
    case 6: return (INT64_MIN / 2) / (1 + small) * (small & 1 ? -1 : 1); /* -+2^62 / n */
    case 7: return INT64_MAX / (2 + small);
    case 8: return (int64_t)((uint64_t)value << (fuzz_u8(in) % 63));
    case 9: return ((int64_t)1 << (31 + fuzz_u8(in) % 32)) + small - 4;
    default: return (int64_t)fuzz_u64(in);
  }
}

/* A float that is usually in [lo, hi] and sometimes NaN, inf, negative, huge, or just outside. */
static inline float fuzz_float(fuzz_input_t *in, float lo, float hi) {
  uint8_t mode = fuzz_u8(in);
  uint32_t raw = fuzz_u32(in);
  if ((mode & 15) == 0) {
    float f;
    memcpy(&f, &raw, sizeof f);
    return f;
  }
  if ((mode & 15) == 1) { /* one ulp or so past an end */
    float f = (mode & 16) ? hi : lo;
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += (raw & 3) + 1;
    memcpy(&f, &bits, sizeof f);
    return f;
  }
  return lo + (hi - lo) * (float)(raw % 10001u) / 10000.0f;
}

#endif
