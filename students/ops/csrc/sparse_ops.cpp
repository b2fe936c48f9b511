// Event-driven linear layer for binary spike inputs (students/ops/event_linear): y = x W^T + b where x is {0, 1},
// computed as a gather-add of the rows of W^T [in, out] selected by each input row's spikes. The weight reads,
// and the adds, scale with the firing rate instead of the layer size. Plain C ABI, loaded through ctypes with
// spike_ops.cpp (students/ops/csrc/__init__.py); see event_linear/reference.py for the dense truth.
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

// Output columns summed together per row, held in SIMD registers while the active rows of W^T stream past:
// 8 vectors of 16 fp32 (8 AVX-512 registers, or 16 AVX2 ones when a vector is split in two).
#ifdef __AVX512F__
constexpr int64_t kVecs = 8;
#else
constexpr int64_t kVecs = 4;
#endif
constexpr int64_t kTile = 16 * kVecs;
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32x16 load16(const uint16_t* p) {  // 16 bf16 -> fp32: the bf16 bits are the high half of the fp32 bits
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

// Bits of 1.0 and of -0.0 in fp32 and bf16. Compared as integers, so -ffast-math cannot fold away the NaN case.
template <typename X> struct Bits;
template <> struct Bits<float> { using U = uint32_t; static constexpr U kOne = 0x3F800000u, kSign = 0x80000000u; };
template <> struct Bits<uint16_t> { using U = uint16_t; static constexpr U kOne = 0x3F80u, kSign = 0x8000u; };

// Spike positions of one input row: idx gets the columns equal to 1; returns their count, or -1 if any entry
// is neither 0 nor 1 (the caller then runs the dense matmul instead). Branch-free: spikes are unpredictable.
template <typename X>
int64_t row_events(const X* x, int64_t in, int32_t* idx) {
  using U = typename Bits<X>::U;
  int64_t n = 0;
  bool other = false;
  for (int64_t i = 0; i < in; ++i) {
    U b;
    std::memcpy(&b, x + i, sizeof b);
    const bool one = b == Bits<X>::kOne;
    idx[n] = static_cast<int32_t>(i);
    n += one;
    other |= !one & ((b & static_cast<U>(~Bits<X>::kSign)) != 0);  // neither 1 nor +-0
  }
  return other ? -1 : n;
}

// y[c0 : c0 + kTile] = bias + sum over the n events e of wt[e, c0 : c0 + kTile] (a full tile).
template <typename W>
inline void gather_tile(const W* wt, int64_t out, const int32_t* idx, int64_t n, const float* bias, int64_t c0,
                        float* y) {
  f32x16 acc[kVecs];
  for (int64_t v = 0; v < kVecs; ++v) acc[v] = bias ? load16(bias + c0 + 16 * v) : f32x16{};
  const W* base = wt + c0;
  for (int64_t e = 0; e < n; ++e) {
    const W* row = base + static_cast<int64_t>(idx[e]) * out;
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVecs; ++v) acc[v] += load16(row + 16 * v);
  }
  std::memcpy(y + c0, acc, sizeof acc);
}

// The last, partial tile of w < kTile columns.
template <typename W>
void gather_tail(const W* wt, int64_t out, const int32_t* idx, int64_t n, const float* bias, int64_t c0, int64_t w,
                 float* y) {
  for (int64_t j = 0; j < w; ++j) y[c0 + j] = bias ? bias[c0 + j] : 0.0f;
  for (int64_t e = 0; e < n; ++e) {
    const W* row = wt + static_cast<int64_t>(idx[e]) * out + c0;
    for (int64_t j = 0; j < w; ++j) y[c0 + j] += load1(row + j);
  }
}

template <typename X, typename W>
int event_linear_t(const X* x, const W* wt, const float* bias, float* y, int32_t* idx, int32_t* counts, int64_t M,
                   int64_t in, int64_t out, double max_rate, int nthreads) {
  // 1) events per row (cheap: one pass over x); any non-binary entry or too many events -> decline.
  int bad = 0;
  int64_t total = 0;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) schedule(static) reduction(| : bad) reduction(+ : total)
  for (int64_t m = 0; m < M; ++m) {
    const int64_t n = row_events(x + m * in, in, idx + m * in);
    counts[m] = static_cast<int32_t>(n);
    bad |= n < 0;
    total += n;
  }
  if (bad) return 2;
  if (static_cast<double>(total) > max_rate * static_cast<double>(M * in)) return 1;
  // 2) gather-add, parallel over output tiles; each tile of W^T (in x kTile) stays in cache across the rows.
  const int64_t tiles = (out + kTile - 1) / kTile;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) schedule(dynamic, 8)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t c0 = t * kTile, w = std::min(kTile, out - c0);
    for (int64_t m = 0; m < M; ++m) {
      if (w == kTile) {
        gather_tile(wt, out, idx + m * in, counts[m], bias, c0, y + m * out);
      } else {
        gather_tail(wt, out, idx + m * in, counts[m], bias, c0, w, y + m * out);
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// y [M, out] fp32 = x [M, in] @ W^T + bias for binary x, from wt = W^T [in, out] contiguous.
// x_bf16 / w_bf16: the buffer holds bf16 bits (uint16) instead of fp32. bias [out] fp32 or null.
// scratch [M * in + M] int32: the spike positions of each row, then the spike count of each row. Returns 0 when y is written, 1 when the event rate
// exceeds max_rate, 2 when x is not binary (y untouched in both cases: run the dense matmul).
int event_linear(const void* x, const void* wt, const float* bias, float* y, int32_t* scratch, int64_t M, int64_t in,
                 int64_t out, int x_bf16, int w_bf16, double max_rate, int nthreads) {
  int32_t* idx = scratch;
  int32_t* counts = scratch + M * in;
  if (x_bf16) {
    const auto* xs = static_cast<const uint16_t*>(x);
    return w_bf16 ? event_linear_t(xs, static_cast<const uint16_t*>(wt), bias, y, idx, counts, M, in, out,
                                   max_rate, nthreads)
                  : event_linear_t(xs, static_cast<const float*>(wt), bias, y, idx, counts, M, in, out,
                                   max_rate, nthreads);
  }
  const auto* xs = static_cast<const float*>(x);
  return w_bf16 ? event_linear_t(xs, static_cast<const uint16_t*>(wt), bias, y, idx, counts, M, in, out, max_rate,
                                 nthreads)
                : event_linear_t(xs, static_cast<const float*>(wt), bias, y, idx, counts, M, in, out, max_rate,
                                 nthreads);
}

}  // extern "C"
