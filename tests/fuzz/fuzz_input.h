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

static inline uint8_t fuzz_u8(fuzz_input_t *in) { return in->at < in->size ? in->data[in->at++] : 0; }

/* An int in [lo, hi], with a 1-in-16 chance of an arbitrary (often invalid) 32-bit value. */
static inline int32_t fuzz_int(fuzz_input_t *in, int32_t lo, int32_t hi) {
  uint8_t mode = fuzz_u8(in);
  uint32_t raw = fuzz_u32(in);
  if ((mode & 15) == 0) return (int32_t)raw;
  return lo + (int32_t)(raw % (uint32_t)(hi - lo + 1));
}

/* A float that is usually in [lo, hi] and sometimes NaN, inf, negative or huge. */
static inline float fuzz_float(fuzz_input_t *in, float lo, float hi) {
  uint8_t mode = fuzz_u8(in);
  uint32_t raw = fuzz_u32(in);
  if ((mode & 15) == 0) {
    float f;
    memcpy(&f, &raw, sizeof f);
    return f;
  }
  return lo + (hi - lo) * (float)(raw % 10001u) / 10000.0f;
}

#endif
