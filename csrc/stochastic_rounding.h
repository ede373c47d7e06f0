// Stochastic rounding of float32 to bfloat16 (ema_stochastic_), written once for the
// host and the device so that the CPU kernels, the CUDA kernels and the reference
// (wavg_ext/ops/reference.py, which re-implements these lines) give the same bits.
//
// A float32 value lies between two neighbouring bfloat16 values; it is rounded away
// from zero with probability (its low 16 bits) / 2^16 by adding 16 random bits to its
// bit pattern and truncating, so the rounded value is exact in expectation: an EMA whose
// per-update change is below half a bfloat16 ulp still moves on average, where
// round-to-nearest would freeze it. NaN and +-inf are converted as a cast converts them.
//
// The random bits are a counter-based hash, not a generator's state: element e of the
// pair at position p of a call with seed s gets
//   noise(s, p, e) = lowbias32(low32(e) ^ block_key(pair_key(s, p), e >> 32)) >> 16
// which needs no state, no synchronization and no order of evaluation, and makes a call
// reproducible from (seed, the lists) alone on every backend and thread count. e counts
// the pair's elements in the order of the average's memory (its logical order when the
// average is not dense).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace wavg_ext::sr {

// Vigna's splitmix64 finalizer: distinct inputs give unrelated 64-bit outputs.
C10_HOST_DEVICE inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The key of the pair at position `index` of the caller's lists.
C10_HOST_DEVICE inline uint64_t pair_key(int64_t seed, int64_t index) {
  return splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(index));
}

// The 32-bit key of the pair's elements [block * 2^32, (block + 1) * 2^32). Kernels work
// on items that never straddle such a boundary (their sizes divide 2^32).
C10_HOST_DEVICE inline uint32_t block_key(uint64_t pair_key, uint64_t block) {
  return static_cast<uint32_t>(splitmix64(pair_key + block) >> 32);
}

// Wellons' lowbias32: a cheap 32-bit integer hash with good avalanche (two multiplies).
C10_HOST_DEVICE inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// 16 random bits for element `element` (its low 32 bits) under `key` (block_key).
C10_HOST_DEVICE inline uint32_t noise16(uint32_t key, uint32_t element) {
  return lowbias32(element ^ key) >> 16;
}

constexpr uint32_t kExponentMask = 0x7F800000u;

// The bfloat16 bits of v rounded with `noise` (16 random bits); NaN/inf as a cast.
C10_HOST_DEVICE inline c10::BFloat16 round_to_bfloat16(float v, uint32_t noise) {
#ifdef __CUDA_ARCH__
  const uint32_t bits = __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
#endif
  if ((bits & kExponentMask) == kExponentMask) return c10::BFloat16(v);
  return c10::BFloat16(static_cast<uint16_t>((bits + noise) >> 16), c10::BFloat16::from_bits());
}

}  // namespace wavg_ext::sr
