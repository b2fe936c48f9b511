// Fused CPU kernels for training the spiking student: the LM head + cross-entropy (linear_ce) and the LIF
// neurons with their elementwise producer folded in (fused_lif). Plain C ABI, fp32, contiguous buffers, OpenMP
// over independent lanes; loaded through ctypes by students/ops/csrc/__init__.py (library()).
// Every function mirrors a reference in students/ops/linear_ce/reference.py or students/ops/fused_lif/reference.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "lif_charge.h"

namespace {

// Explicit vectors: GCC otherwise turns the row-gather loop into scalar code (it pairs the rows it unrolls).
#ifdef __AVX512F__
typedef float vecf __attribute__((vector_size(64), aligned(4)));
#else
typedef float vecf __attribute__((vector_size(32), aligned(4)));
#endif
constexpr int kVec = sizeof(vecf) / sizeof(float);
constexpr int64_t kTile = 32;        // vocabulary columns per tile of the packed layouts: 32 KiB of W^T per tile
constexpr int kTileVecs = kTile / kVec;
constexpr int kSplit = 2;            // independent partial sums per row (latency of the add chains)

// out[r, 0:kTile] (+)= sum over j in idx[ptr[r]:ptr[r+1]] of src[j, 0:kTile], rows of src kTile apart.
inline void gather_rows(const float* src, const int32_t* ptr, const int32_t* idx, float* out, int64_t ld_out,
                        int64_t R, bool accumulate) {
  for (int64_t r = 0; r < R; ++r) {
    vecf acc[kSplit][kTileVecs];
    float* o = out + r * ld_out;
    for (int k = 0; k < kTileVecs; ++k) {
      vecf init{};
      if (accumulate) std::memcpy(&init, o + k * kVec, sizeof(vecf));
      acc[0][k] = init;
      for (int u = 1; u < kSplit; ++u) acc[u][k] = vecf{};
    }
    int32_t p = ptr[r];
    const int32_t end = ptr[r + 1];
    for (; p + kSplit <= end; p += kSplit)
      for (int u = 0; u < kSplit; ++u) {
        const vecf* s = reinterpret_cast<const vecf*>(src + static_cast<int64_t>(idx[p + u]) * kTile);
        for (int k = 0; k < kTileVecs; ++k) acc[u][k] += s[k];
      }
    for (; p < end; ++p) {
      const vecf* s = reinterpret_cast<const vecf*>(src + static_cast<int64_t>(idx[p]) * kTile);
      for (int k = 0; k < kTileVecs; ++k) acc[0][k] += s[k];
    }
    for (int k = 0; k < kTileVecs; ++k) {
      for (int u = 1; u < kSplit; ++u) acc[0][k] += acc[u][k];
      std::memcpy(o + k * kVec, &acc[0][k], sizeof(vecf));
    }
  }
}

}  // namespace

extern "C" {

int64_t spike_tile() { return kTile; }

// Pack W [V, C] into wp [tiles, C, kTile]: wp[t, c, k] = W[t*kTile + k, c], zero for rows past V.
void pack_tiles(const float* w, int64_t V, int64_t C, float* wp, int64_t tiles, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    float* dst = wp + t * C * kTile;
    for (int64_t k = 0; k < kTile; ++k) {
      const int64_t v = t * kTile + k;
      if (v < V)
        for (int64_t c = 0; c < C; ++c) dst[c * kTile + k] = w[v * C + c];
      else
        for (int64_t c = 0; c < C; ++c) dst[c * kTile + k] = 0.0f;
    }
  }
}

// The inverse for the first V rows: w[v, c] = wp[v / kTile, c, v % kTile].
void unpack_tiles(const float* wp, int64_t V, int64_t C, float* w, int64_t tiles, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const float* src = wp + t * C * kTile;
    for (int64_t k = 0; k < kTile && t * kTile + k < V; ++k)
      for (int64_t c = 0; c < C; ++c) w[(t * kTile + k) * C + c] = src[c * kTile + k];
  }
}

// Logits of binary inputs: z[r, :] = sum over the active inputs c of row r of W[:, c], read from the packed
// weight wp [tiles, C, kTile] (wp[t, c, k] = W[t*kTile + k, c], zero past V). ptr [R+1], idx: the CSR list
// of active c per row. z [R, ld] with ld >= tiles*kTile; every column up to tiles*kTile is written.
void spike_logits(const float* wp, int64_t C, const int32_t* ptr, const int32_t* idx, float* z, int64_t ld,
                  int64_t R, int64_t tiles, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) gather_rows(wp + t * C * kTile, ptr, idx, z + t * kTile, ld, R, false);
}

// Weight gradient of binary inputs: gwp[t, c, :] (+)= sum over the rows r where input c fired of dz[r, tile t],
// i.e. dW = dz^T x in the packed layout (accumulate = 0 overwrites gwp). dz [n, ld]; ptr [C+1], idx: the CSR list
// of active rows per input c.
void spike_weight_grad(const float* dz, int64_t ld, int64_t n, const int32_t* ptr, const int32_t* idx,
                       float* gwp, int64_t C, int64_t tiles, int accumulate, int nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> buf(static_cast<size_t>(n) * kTile + kVec);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      for (int64_t r = 0; r < n; ++r) std::memcpy(buf.data() + r * kTile, dz + r * ld + t * kTile, sizeof(float) * kTile);
      gather_rows(buf.data(), ptr, idx, gwp + t * C * kTile, kTile, C, accumulate != 0);
    }
  }
}

// Cross-entropy rows: loss[r] = logsumexp(z[r, :V]) - z[r, label[r]]; label -100 rows give 0. With want_grad
// z[r, :V] is overwritten with scale * (softmax(z[r]) - onehot(label[r])) (zeros on ignored rows).
void ce_rows(float* z, int64_t ld, const int64_t* labels, int64_t n, int64_t V, float scale, int want_grad,
             float* loss, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
  for (int64_t r = 0; r < n; ++r) {
    float* zr = z + r * ld;
    const int64_t label = labels[r];
    if (label == -100) {
      loss[r] = 0.0f;
      if (want_grad) std::memset(zr, 0, sizeof(float) * V);
      continue;
    }
    float m = -INFINITY;
    for (int64_t j = 0; j < V; ++j) m = std::max(m, zr[j]);
    const float target = zr[label];
    float s = 0.0f;
    if (want_grad) {
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < V; ++j) {
        const float e = std::exp(zr[j] - m);
        zr[j] = e;
        s += e;
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < V; ++j) s += std::exp(zr[j] - m);
    }
    loss[r] = m + std::log(s) - target;
    if (!want_grad) continue;
    const float c = scale / s;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) zr[j] *= c;
    zr[label] -= scale;
  }
}

}  // extern "C"

// ---- fused_lif: a LIF layer whose input current is computed on the fly from its producer's outputs ----------
// LIF (students/ops/lif/reference.py): H_t = lif_charge(V_{t-1}, X_t) (lif_charge.h: spikingjelly's charge),
// S_t = H_t >= vth, V_t = H_t (1 - S_t) (hard) or H_t - S_t vth (soft). fire = 0 skips the neuron: the output is
// the current X itself.
// Forwards store nothing; backwards recompute the current and the membrane per lane block.

namespace {

constexpr int64_t kLanes = 64;  // neurons advanced together per task

struct Lif {
  LifCharge charge;
  float vth, alpha;
  int kind, soft, detach, surrogate, fire;  // kind: ChargeKind
};

inline float surrogate_grad(float x, int kind, float alpha) {  // students/ops/surrogate.py
  if (kind == 0) {
    const float z = 1.57079632679489662f * alpha * x;
    return alpha / (2.0f * (1.0f + z * z));
  }
  const float sg = 1.0f / (1.0f + std::exp(-alpha * x));
  return alpha * sg * (1.0f - sg);
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Input currents of one step, lane j: the producers of the fused ops (see their references).
struct GateCurrent {  // sigmoid(x) * y
  const float *x, *y;
  float operator()(int64_t j) const { return sigmoid(x[j]) * y[j]; }
};
struct ReluSquareCurrent {  // relu(x)^2
  const float* x;
  float operator()(int64_t j) const {
    const float r = std::max(x[j], 0.0f);
    return r * r;
  }
};
struct ShiftCurrent {  // token shift: prev + mix (cur - prev)
  const float *cur, *prev, *mix;
  float operator()(int64_t j) const { return prev[j] + mix[j] * (cur[j] - prev[j]); }
};

// Forward over S steps of w lanes: current(t) returns the step's row functor, current(t)(j) = X_t of lane j
// (built once per step, so the lane loop sees plain affine loads); out row t starts at out + t * ld.
template <int KIND, class Current>
inline void lif_lanes_forward(Current current, float* out, int64_t ld, const float* v0, float* v_last, int64_t S,
                              int64_t w, const Lif& p) {
  const LifCharge c = p.charge;
  float v[kLanes];
  for (int64_t j = 0; j < w; ++j) v[j] = v0 ? v0[j] : 0.0f;
  for (int64_t t = 0; t < S; ++t) {
    float* o = out + t * ld;
    const auto x_t = current(t);
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const float x = x_t(j);
      const float h = lif_charge<KIND>(v[j], x, c);
      const float s = static_cast<float>(h - p.vth >= 0.0f);
      v[j] = p.soft ? h - s * p.vth : h * (1.0f - s);
      o[j] = p.fire ? s : x;
    }
  }
  if (v_last && p.fire)
    for (int64_t j = 0; j < w; ++j) v_last[j] = v[j];
}

// Backward over S steps of w lanes. g_out row t at g_out + t * ld; give(t)(j, gx) receives d loss / d X_t
// (distinct j within a step, so the lane loop vectorises). hbuf: kLanes * S floats for the
// recomputed membrane. g_vlast / g_v0 may be null. SOFT, DETACH, SUR, KIND are compile-time (see with_flags).
template <bool SOFT, bool DETACH, int SUR, int KIND, class Current, class Give>
inline void lif_lanes_backward(Current current, Give give, const float* g_out, int64_t ld, const float* v0,
                               const float* g_vlast, float* g_v0, float* hbuf, int64_t S, int64_t w, const Lif& p) {
  const LifCharge c = p.charge;
  const float vth = p.vth, alpha = p.alpha;
  float v[kLanes], gv[kLanes];
  for (int64_t j = 0; j < w; ++j) {
    v[j] = v0 ? v0[j] : 0.0f;
    gv[j] = g_vlast ? g_vlast[j] : 0.0f;
  }
  for (int64_t t = 0; t < S; ++t) {
    float* h = hbuf + t * kLanes;
    const auto x_t = current(t);
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const float ht = lif_charge<KIND>(v[j], x_t(j), c);
      const float s = static_cast<float>(ht - vth >= 0.0f);
      v[j] = SOFT ? ht - s * vth : ht * (1.0f - s);
      h[j] = ht;
    }
  }
  for (int64_t t = S - 1; t >= 0; --t) {
    const float* h = hbuf + t * kLanes;
    const float* gs = g_out + t * ld;
    const auto give_t = give(t);
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const float ht = h[j], xs = ht - vth;
      const float s = static_cast<float>(xs >= 0.0f);
      const float dv_dh = SOFT ? 1.0f : 1.0f - s;
      const float dv_ds = DETACH ? 0.0f : (SOFT ? -vth : -ht);
      const float gh = gv[j] * dv_dh + (gs[j] + gv[j] * dv_ds) * surrogate_grad(xs, SUR, alpha);
      float gx;
      lif_charge_grad<KIND>(gh, c, gx, gv[j]);
      give_t(j, gx);
    }
  }
  if (g_v0)
    for (int64_t j = 0; j < w; ++j) g_v0[j] = gv[j];
}

// fire = 0: the output was the current itself, so its gradient passes straight to the producer.
template <class Give>
inline void pass_lanes_backward(Give give, const float* g_out, int64_t ld, int64_t S, int64_t w) {
  for (int64_t t = S - 1; t >= 0; --t) {
    const float* gs = g_out + t * ld;
    const auto give_t = give(t);
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) give_t(j, gs[j]);
  }
}

// The LIF forward for one lane block, its charge kind compile-time.
template <class Current>
inline void lanes_forward(Current current, float* out, int64_t ld, const float* v0, float* v_last, int64_t S,
                          int64_t w, const Lif& p) {
  with_charge_kind(p.kind, [&](auto kind) {
    lif_lanes_forward<decltype(kind)::value>(current, out, ld, v0, v_last, S, w, p);
  });
}

// Calls f(soft, detach, surrogate) with std::integral_constant arguments matching p (8 instantiations).
template <class F>
inline void with_flags(const Lif& p, F f) {
  using T = std::true_type;
  using N = std::false_type;
  using A = std::integral_constant<int, 0>;
  using G = std::integral_constant<int, 1>;
  const int code = (p.soft ? 4 : 0) + (p.detach ? 2 : 0) + (p.surrogate ? 1 : 0);
  switch (code) {
    case 0: f(N{}, N{}, A{}); break;
    case 1: f(N{}, N{}, G{}); break;
    case 2: f(N{}, T{}, A{}); break;
    case 3: f(N{}, T{}, G{}); break;
    case 4: f(T{}, N{}, A{}); break;
    case 5: f(T{}, N{}, G{}); break;
    case 6: f(T{}, T{}, A{}); break;
    default: f(T{}, T{}, G{}); break;
  }
}

// The LIF backward for one lane block, or the pass-through when there is no neuron.
template <class Current, class Give>
inline void lanes_backward(Current current, Give give, const float* g_out, int64_t ld, const float* v0,
                           const float* g_vlast, float* g_v0, float* hbuf, int64_t S, int64_t w, const Lif& p) {
  if (!p.fire) {
    pass_lanes_backward(give, g_out, ld, S, w);
    return;
  }
  with_flags(p, [&](auto soft, auto detach, auto sur) {
    with_charge_kind(p.kind, [&](auto kind) {
      lif_lanes_backward<decltype(soft)::value, decltype(detach)::value, decltype(sur)::value,
                         decltype(kind)::value>(current, give, g_out, ld, v0, g_vlast, g_v0, hbuf, S, w, p);
    });
  });
}

}  // namespace

extern "C" {

// Pointwise producers, x and y [B, S, N]: kind 0 = sigmoid gate, X = sigmoid(x) * y; kind 1 = X = relu(x)^2
// (y unused). v0 [B, N] or null -> out [B, S, N] (spikes, or X when fire = 0), v_last [B, N] (fire only).
void pointwise_lif_forward(int kind, const float* x, const float* y, const float* v0, float* out, float* v_last,
                           int64_t B, int64_t S, int64_t N, int charge, double inv_tau, double beta,
                           float vth, int soft, int fire, int nthreads) {
  const Lif p{{inv_tau, beta}, vth, 0.0f, charge, soft, 0, 0, fire};
  const int64_t blocks = (N + kLanes - 1) / kLanes;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < B * blocks; ++i) {
    const int64_t b = i / blocks, n0 = (i % blocks) * kLanes, w = std::min(N, n0 + kLanes) - n0;
    const float* xb = x + b * S * N + n0;
    const float* yb = y ? y + b * S * N + n0 : nullptr;
    const float* vb = v0 ? v0 + b * N + n0 : nullptr;
    float* vl = v_last ? v_last + b * N + n0 : nullptr;
    if (kind == 0)
      lanes_forward([&](int64_t t) { return GateCurrent{xb + t * N, yb + t * N}; }, out + b * S * N + n0, N, vb, vl,
                    S, w, p);
    else
      lanes_forward([&](int64_t t) { return ReluSquareCurrent{xb + t * N}; }, out + b * S * N + n0, N, vb, vl, S, w,
                    p);
  }
}

// Backward of pointwise_lif_forward: g_out [B, S, N], g_vlast [B, N] or null -> g_x, g_y (kind 0) [B, S, N],
// g_v0 [B, N] or null.
void pointwise_lif_backward(int kind, const float* x, const float* y, const float* v0, const float* g_out,
                            const float* g_vlast, float* g_x, float* g_y, float* g_v0, int64_t B, int64_t S,
                            int64_t N, int charge, double inv_tau, double beta, float vth, int soft,
                            int detach, int surrogate, float alpha, int fire, int nthreads) {
  const Lif p{{inv_tau, beta}, vth, alpha, charge, soft, detach, surrogate, fire};
  const int64_t blocks = (N + kLanes - 1) / kLanes;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> hbuf(fire ? static_cast<size_t>(S) * kLanes : 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * blocks; ++i) {
      const int64_t b = i / blocks, n0 = (i % blocks) * kLanes, w = std::min(N, n0 + kLanes) - n0;
      const int64_t off = b * S * N + n0;
      const float* xb = x + off;
      const float* yb = y ? y + off : nullptr;
      float* gx = g_x + off;
      float* gy = g_y ? g_y + off : nullptr;
      const float* vb = v0 ? v0 + b * N + n0 : nullptr;
      const float* gvl = g_vlast ? g_vlast + b * N + n0 : nullptr;
      float* gv0 = g_v0 ? g_v0 + b * N + n0 : nullptr;
      if (kind == 0) {
        auto current = [&](int64_t t) { return GateCurrent{xb + t * N, yb + t * N}; };
        auto give = [&](int64_t t) {
          const float *xr = xb + t * N, *yr = yb + t * N;
          float *gxr = gx + t * N, *gyr = gy + t * N;
          return [=](int64_t j, float g) {
            const float sg = sigmoid(xr[j]);
            gxr[j] = g * yr[j] * sg * (1.0f - sg);
            gyr[j] = g * sg;
          };
        };
        lanes_backward(current, give, g_out + off, N, vb, gvl, gv0, hbuf.data(), S, w, p);
      } else {
        auto current = [&](int64_t t) { return ReluSquareCurrent{xb + t * N}; };
        auto give = [&](int64_t t) {
          const float* xr = xb + t * N;
          float* gxr = gx + t * N;
          return [=](int64_t j, float g) { gxr[j] = g * 2.0f * std::max(xr[j], 0.0f); };
        };
        lanes_backward(current, give, g_out + off, N, vb, gvl, gv0, hbuf.data(), S, w, p);
      }
    }
  }
}

// Token shift in the steps layout, h [B, S, C] with S = L*T: the previous token of step s is s - T, before the
// first token prev [B, T, C] (null: zeros). Branch k of channel c: X = hp + mix[k, c] (h - hp); lane k*C + c of
// out [B, S, K*C] (spikes, or X when fire = 0); v0, v_last [B, K*C] (fire only).
void shift_lif_forward(const float* h, const float* mix, const float* prev, const float* v0, float* out,
                       float* v_last, int64_t B, int64_t S, int64_t C, int64_t K, int64_t T, int charge,
                       double inv_tau, double beta, float vth, int soft, int fire, int nthreads) {
  const Lif p{{inv_tau, beta}, vth, 0.0f, charge, soft, 0, 0, fire};
  const int64_t blocks = (C + kLanes - 1) / kLanes, N = K * C;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
  for (int64_t i = 0; i < B * blocks; ++i)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t b = i / blocks, c0 = (i % blocks) * kLanes, w = std::min(C, c0 + kLanes) - c0;
      const float* hb = h + b * S * C + c0;
      const float* pb = prev ? prev + b * T * C + c0 : nullptr;
      const float* m = mix + k * C + c0;
      const float zeros[kLanes] = {};
      auto current = [&](int64_t t) {
        return ShiftCurrent{hb + t * C, t >= T ? hb + (t - T) * C : (pb ? pb + t * C : zeros), m};
      };
      lanes_forward(current, out + b * S * N + k * C + c0, N, v0 ? v0 + b * N + k * C + c0 : nullptr,
                    v_last ? v_last + b * N + k * C + c0 : nullptr, S, w, p);
    }
}

// Backward of shift_lif_forward. g_h [B, S, C] must hold the gradient already flowing into h (zeros, or the
// gradient of the returned last-token state); it is accumulated into. g_mix_rows [B, K, C] (per batch row, the
// caller sums them), g_prev [B, T, C] and g_v0 [B, K*C] are written; g_prev, g_v0, g_vlast may be null.
void shift_lif_backward(const float* h, const float* mix, const float* prev, const float* v0, const float* g_out,
                        const float* g_vlast, float* g_h, float* g_mix_rows, float* g_prev, float* g_v0, int64_t B,
                        int64_t S, int64_t C, int64_t K, int64_t T, int charge, double inv_tau, double beta,
                        float vth, int soft, int detach, int surrogate, float alpha, int fire, int nthreads) {
  const Lif p{{inv_tau, beta}, vth, alpha, charge, soft, detach, surrogate, fire};
  const int64_t blocks = (C + kLanes - 1) / kLanes, N = K * C;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> hbuf(fire ? static_cast<size_t>(S) * kLanes : 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * blocks; ++i) {
      // one task owns channels c0..c0+w of batch row b for every branch: the branches add into the same g_h
      const int64_t b = i / blocks, c0 = (i % blocks) * kLanes, w = std::min(C, c0 + kLanes) - c0;
      const float* hb = h + b * S * C + c0;
      const float* pb = prev ? prev + b * T * C + c0 : nullptr;
      float* gh = g_h + b * S * C + c0;
      float* gp = g_prev ? g_prev + b * T * C + c0 : nullptr;
      if (gp)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < w; ++j) gp[t * C + j] = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const float* m = mix + k * C + c0;
        float* gm = g_mix_rows + (b * K + k) * C + c0;
        float gm_acc[kLanes] = {}, sink[kLanes];
        const float zeros[kLanes] = {};
        // the rows of the previous token at step t: inside h, or the carried prev (zeros / a sink when absent)
        auto before = [&](int64_t t) { return t >= T ? hb + (t - T) * C : (pb ? pb + t * C : zeros); };
        auto current = [&](int64_t t) { return ShiftCurrent{hb + t * C, before(t), m}; };
        float* acc = gm_acc;
        auto give = [&](int64_t t) {
          const float *cur = hb + t * C, *prev_row = before(t);
          float *g_cur = gh + t * C, *g_prev_row = t >= T ? gh + (t - T) * C : (gp ? gp + t * C : sink);
          return [=](int64_t j, float g) {
            g_cur[j] += m[j] * g;
            g_prev_row[j] += (1.0f - m[j]) * g;
            acc[j] += g * (cur[j] - prev_row[j]);
          };
        };
        lanes_backward(current, give, g_out + b * S * N + k * C + c0, N,
                           v0 ? v0 + b * N + k * C + c0 : nullptr, g_vlast ? g_vlast + b * N + k * C + c0 : nullptr,
                           g_v0 ? g_v0 + b * N + k * C + c0 : nullptr, hbuf.data(), S, w, p);
        for (int64_t j = 0; j < w; ++j) gm[j] = gm_acc[j];
      }
    }
  }
}

}  // extern "C"
