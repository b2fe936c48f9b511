// Fused CPU kernels for the spike ops: plain C ABI, fp32, contiguous buffers, OpenMP over independent lanes.
// Loaded through ctypes by students/ops/_cpu_lib.py (no torch headers, so it compiles in about a second).
// Every function mirrors the matching reference in students/ops/*/reference.py; see that file for the maths.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lif_charge.h"

namespace {

constexpr float kHalfPi = 1.57079632679489662f;
constexpr int64_t kLane = 64;  // lanes advanced together: a few SIMD vectors, 256 contiguous bytes per row

// d spike / d x for surrogate 0 = atan, 1 = sigmoid (students/ops/surrogate.py).
inline float surrogate_grad(float x, int kind, float alpha) {
  if (kind == 0) {
    const float z = kHalfPi * alpha * x;
    return alpha / (2.0f * (1.0f + z * z));
  }
  const float sg = 1.0f / (1.0f + std::exp(-alpha * x));
  return alpha * sg * (1.0f - sg);
}

// (e^{a - m}, e^{b - m}) with m = max(a, b), using one exp: the larger side is exactly 1.
inline void max_pair(float a, float b, float& ea, float& eb) {
  const float e = std::exp(-std::fabs(a - b));
  ea = a >= b ? 1.0f : e;
  eb = a >= b ? e : 1.0f;
}

struct LifParams {
  LifCharge charge;
  float vth, alpha;
};

// Membrane charge for the w lanes starting at n0 of one batch row, all S steps. Writes spikes [S, N] and the
// final membrane (forward), or the pre-spike membrane h [S, kLane] (backward recompute).
template <bool SOFT, bool FORWARD, int KIND>
void lif_lanes(const float* x, const float* v0, float* spikes, float* v_last, float* h, int64_t S, int64_t N,
               int64_t n0, int64_t w, const LifParams& p) {
  const LifCharge c = p.charge;
  const float vth = p.vth;
  float v[kLane];
  for (int64_t j = 0; j < w; ++j) v[j] = v0 ? v0[n0 + j] : 0.0f;
  for (int64_t t = 0; t < S; ++t) {
    const float* xt = x + t * N + n0;
    float* out = FORWARD ? spikes + t * N + n0 : h + t * kLane;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const float ht = lif_charge<KIND>(v[j], xt[j], c);
      const float s = static_cast<float>(ht - vth >= 0.0f);
      v[j] = SOFT ? ht - s * vth : ht * (1.0f - s);
      out[j] = FORWARD ? s : ht;
    }
  }
  if (FORWARD)
    for (int64_t j = 0; j < w; ++j) v_last[n0 + j] = v[j];
}

template <bool SOFT, int KIND>
void lif_forward_t(const float* x, const float* v0, float* spikes, float* v_last, int64_t B, int64_t S,
                   int64_t N, const LifParams& p, int nthreads) {
  const int64_t blocks = (N + kLane - 1) / kLane;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < B * blocks; ++i) {
    const int64_t b = i / blocks, n0 = (i % blocks) * kLane, w = std::min(N, n0 + kLane) - n0;
    lif_lanes<SOFT, true, KIND>(x + b * S * N, v0 ? v0 + b * N : nullptr, spikes + b * S * N, v_last + b * N,
                                nullptr, S, N, n0, w, p);
  }
}

// Reverse-time surrogate-gradient recurrence for one lane block, given the recomputed membrane h.
template <bool SOFT, bool DETACH, int SUR, int KIND>
void lif_reverse(const float* h, const float* g_spikes, float* g_x, float* gv, int64_t S, int64_t N, int64_t w,
                 const LifParams& p) {
  const LifCharge c = p.charge;
  const float vth = p.vth, alpha = p.alpha;
  for (int64_t t = S - 1; t >= 0; --t) {
    const float* gs = g_spikes + t * N;
    float* gx = g_x + t * N;
    const float* ht_row = h + t * kLane;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const float ht = ht_row[j], xs = ht - vth;
      const float s = static_cast<float>(xs >= 0.0f);
      // v_t = h_t (1 - s_t) (hard) or h_t - s_t vth (soft); detach_reset drops the path through s_t.
      const float dv_dh = SOFT ? 1.0f : 1.0f - s;
      const float dv_ds = DETACH ? 0.0f : (SOFT ? -vth : -ht);
      const float gh = gv[j] * dv_dh + (gs[j] + gv[j] * dv_ds) * surrogate_grad(xs, SUR, alpha);
      lif_charge_grad<KIND>(gh, c, gx[j], gv[j]);
    }
  }
}

template <bool SOFT, bool DETACH, int SUR, int KIND>
void lif_backward_t(const float* x, const float* v0, const float* g_spikes, const float* g_vlast, float* g_x,
                    float* g_v0, int64_t B, int64_t S, int64_t N, const LifParams& p, int nthreads) {
  const int64_t blocks = (N + kLane - 1) / kLane;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> h(static_cast<size_t>(S) * kLane);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * blocks; ++i) {
      const int64_t b = i / blocks, n0 = (i % blocks) * kLane, w = std::min(N, n0 + kLane) - n0;
      lif_lanes<SOFT, false, KIND>(x + b * S * N, v0 ? v0 + b * N : nullptr, nullptr, nullptr, h.data(), S, N, n0,
                                   w, p);
      float gv[kLane];
      for (int64_t j = 0; j < w; ++j) gv[j] = g_vlast ? g_vlast[b * N + n0 + j] : 0.0f;
      lif_reverse<SOFT, DETACH, SUR, KIND>(h.data(), g_spikes + b * S * N + n0, g_x + b * S * N + n0, gv, S, N, w,
                                           p);
      if (g_v0)
        for (int64_t j = 0; j < w; ++j) g_v0[b * N + n0 + j] = gv[j];
    }
  }
}

using LifBackwardFn = void (*)(const float*, const float*, const float*, const float*, float*, float*, int64_t,
                               int64_t, int64_t, const LifParams&, int);

// lif_backward_t for the run-time flags, one charge kind.
template <int KIND>
LifBackwardFn lif_backward_for(int soft, int detach, int surrogate) {
  static const LifBackwardFn table[8] = {
      lif_backward_t<false, false, 0, KIND>, lif_backward_t<false, false, 1, KIND>,
      lif_backward_t<false, true, 0, KIND>,  lif_backward_t<false, true, 1, KIND>,
      lif_backward_t<true, false, 0, KIND>,  lif_backward_t<true, false, 1, KIND>,
      lif_backward_t<true, true, 0, KIND>,   lif_backward_t<true, true, 1, KIND>};
  return table[(soft ? 4 : 0) + (detach ? 2 : 0) + (surrogate ? 1 : 0)];
}

}  // namespace

extern "C" {

// x [B, S, N], v0 [B, N] or null -> spikes [B, S, N], v_last [B, N]. kind: ChargeKind; inv_tau, beta: LifCharge.
void lif_forward(const float* x, const float* v0, float* spikes, float* v_last, int64_t B, int64_t S, int64_t N,
                 int kind, double inv_tau, double beta, float vth, int soft, int nthreads) {
  const LifParams p{{inv_tau, beta}, vth, 0.0f};
  with_charge_kind(kind, [&](auto k) {
    if (soft)
      lif_forward_t<true, decltype(k)::value>(x, v0, spikes, v_last, B, S, N, p, nthreads);
    else
      lif_forward_t<false, decltype(k)::value>(x, v0, spikes, v_last, B, S, N, p, nthreads);
  });
}

// Backward of lif_forward: recomputes the membrane per lane block (nothing stored in the forward but x, v0).
// g_spikes [B, S, N], g_vlast [B, N] or null -> g_x [B, S, N], g_v0 [B, N] or null.
void lif_backward(const float* x, const float* v0, const float* g_spikes, const float* g_vlast, float* g_x,
                  float* g_v0, int64_t B, int64_t S, int64_t N, int kind, double inv_tau, double beta, float vth,
                  int soft, int detach, int surrogate, float alpha, int nthreads) {
  const LifParams p{{inv_tau, beta}, vth, alpha};
  with_charge_kind(kind, [&](auto k) {
    lif_backward_for<decltype(k)::value>(soft, detach, surrogate)(x, v0, g_spikes, g_vlast, g_x, g_v0, B, S, N, p,
                                                                  nthreads);
  });
}

// WKV forward, running-max form. w = -exp(time_decay) [C], u [C]; k, v, y [B, L, C];
// state_in (num, den, p) [B, C] each or null (empty state); state_out written [B, C] each.
void wkv_forward(const float* w, const float* u, const float* k, const float* v, const float* num0,
                 const float* den0, const float* p0, float* y, float* num1, float* den1, float* p1, int64_t B,
                 int64_t L, int64_t C, int nthreads) {
  const int64_t blocks = (C + kLane - 1) / kLane;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < B * blocks; ++i) {
    const int64_t b = i / blocks, c0 = (i % blocks) * kLane, cw = std::min(C, c0 + kLane) - c0;
    float num[kLane], den[kLane], p[kLane];
    for (int64_t j = 0; j < cw; ++j) {
      const int64_t o = b * C + c0 + j;
      num[j] = num0 ? num0[o] : 0.0f;
      den[j] = den0 ? den0[o] : 0.0f;
      p[j] = p0 ? p0[o] : -1e38f;
    }
    for (int64_t t = 0; t < L; ++t) {
      const int64_t o = (b * L + t) * C + c0;
      #pragma omp simd
      for (int64_t j = 0; j < cw; ++j) {
        const float kt = k[o + j], vt = v[o + j], uk = u[c0 + j] + kt;
        float e1, e2;
        max_pair(p[j], uk, e1, e2);
        y[o + j] = (e1 * num[j] + e2 * vt) / (e1 * den[j] + e2);
        const float pw = p[j] + w[c0 + j];
        max_pair(pw, kt, e1, e2);
        num[j] = e1 * num[j] + e2 * vt;
        den[j] = e1 * den[j] + e2;
        p[j] = std::max(pw, kt);
      }
    }
    for (int64_t j = 0; j < cw; ++j) {
      const int64_t o = b * C + c0 + j;
      num1[o] = num[j];
      den1[o] = den[j];
      p1[o] = p[j];
    }
  }
}

// WKV backward. Adjoints are kept scaled by e^{p_t} (ga = dL/dA_t e^{p_t}, A_t = num_t e^{p_t}), so every factor
// is an exp of a non-positive number and nothing overflows at any length. The states are recomputed per block.
// g_y [B, L, C]; g_num1, g_den1, g_p1 [B, C] or null -> g_k, g_v [B, L, C]; g_w, g_u [B, C] (summed over t;
// g_w is d/dw with w = -exp(time_decay)); g_num0, g_den0, g_p0 [B, C] (written when num0 is given).
void wkv_backward(const float* w, const float* u, const float* k, const float* v, const float* num0,
                  const float* den0, const float* p0, const float* g_y, const float* g_num1, const float* g_den1,
                  const float* g_p1, float* g_k, float* g_v, float* g_w, float* g_u, float* g_num0, float* g_den0,
                  float* g_p0, int64_t B, int64_t L, int64_t C, int nthreads) {
  const int64_t blocks = (C + kLane - 1) / kLane;
#pragma omp parallel num_threads(nthreads)
  {
    // states before each step t: num, den, p for the lanes of this block
    std::vector<float> st(static_cast<size_t>(L + 1) * 3 * kLane);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * blocks; ++i) {
      const int64_t b = i / blocks, c0 = (i % blocks) * kLane, cw = std::min(C, c0 + kLane) - c0;
      float* S = st.data();
      for (int64_t j = 0; j < cw; ++j) {
        const int64_t o = b * C + c0 + j;
        S[j] = num0 ? num0[o] : 0.0f;
        S[kLane + j] = den0 ? den0[o] : 0.0f;
        S[2 * kLane + j] = p0 ? p0[o] : -1e38f;
      }
      for (int64_t t = 0; t < L; ++t) {
        const float* cur = S + t * 3 * kLane;
        float* nxt = S + (t + 1) * 3 * kLane;
        const int64_t o = (b * L + t) * C + c0;
        #pragma omp simd
        for (int64_t j = 0; j < cw; ++j) {
          const float kt = k[o + j], vt = v[o + j], pw = cur[2 * kLane + j] + w[c0 + j];
          float e1, e2;
          max_pair(pw, kt, e1, e2);
          nxt[j] = e1 * cur[j] + e2 * vt;
          nxt[kLane + j] = e1 * cur[kLane + j] + e2;
          nxt[2 * kLane + j] = std::max(pw, kt);
        }
      }
      float ga[kLane], gb[kLane], gp[kLane], gw[kLane], gu[kLane];
      const float* fin = S + L * 3 * kLane;
      for (int64_t j = 0; j < cw; ++j) {
        const int64_t o = b * C + c0 + j;
        ga[j] = g_num1 ? g_num1[o] : 0.0f;
        gb[j] = g_den1 ? g_den1[o] : 0.0f;
        // num_L = A_L e^{-p_L}: p_L as an output also scales num_L and den_L
        gp[j] = (g_p1 ? g_p1[o] : 0.0f) - ga[j] * fin[j] - gb[j] * fin[kLane + j];
        gw[j] = 0.0f;
        gu[j] = 0.0f;
      }
      for (int64_t t = L - 1; t >= 0; --t) {
        const float* cur = S + t * 3 * kLane;
        const int64_t o = (b * L + t) * C + c0;
        #pragma omp simd
        for (int64_t j = 0; j < cw; ++j) {
          const float kt = k[o + j], vt = v[o + j], uk = u[c0 + j] + kt;
          const float num = cur[j], den = cur[kLane + j], p = cur[2 * kLane + j];
          // output y_t from the state before t
          float a1, a2, b1, b2;
          max_pair(p, uk, a1, a2);
          const float dq = a1 * den + a2, yt = (a1 * num + a2 * vt) / dq, gyd = g_y[o + j] / dq;
          // state update t -> t+1
          const float pw = p + w[c0 + j];
          max_pair(pw, kt, b1, b2);
          g_v[o + j] = gyd * a2 + ga[j] * b2;
          // vt - yt = a1 (vt den - num) / dq, written so: with a large time_first, e^{u + k} dominates, yt -> vt
          // and the difference vt - yt would cancel (98% error at u = 20)
          const float gu_t = gyd * a2 * a1 * (vt * den - num) / dq;
          float gk = gu_t + (ga[j] * vt + gb[j]) * b2;
          gu[j] += gu_t;
          gw[j] += (ga[j] * num + gb[j] * den) * b1;
          // p_{t+1} = max(p_t + w, k_t) as a value of its own (only an output p carries it)
          const float keep = pw >= kt ? 1.0f : 0.0f;
          gw[j] += keep * gp[j];
          gk += (1.0f - keep) * gp[j];
          gp[j] *= keep;
          g_k[o + j] = gk;
          ga[j] = gyd * a1 + ga[j] * b1;
          gb[j] = -gyd * yt * a1 + gb[j] * b1;
        }
      }
      for (int64_t j = 0; j < cw; ++j) {
        const int64_t o = b * C + c0 + j;
        g_w[o] = gw[j];
        g_u[o] = gu[j];
        if (g_num0) {
          g_num0[o] = ga[j];
          g_den0[o] = gb[j];
          g_p0[o] = gp[j] + ga[j] * S[j] + gb[j] * S[kLane + j];
        }
      }
    }
  }
}

// SFSA forward mask, in place on a block of scores [BH, R, W] holding query rows row0..row0+R-1 and keys
// 0..W-1: 1 where key j <= query row and score >= theta[bh], else 0.
void sfsa_threshold(float* scores, const float* theta, int64_t BH, int64_t R, int64_t W, int64_t row0,
                    int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < BH * R; ++r) {
    const int64_t bh = r / R, last = std::min(W - 1, row0 + r % R);
    const float th = theta[bh];
    float* row = scores + r * W;
    for (int64_t j = 0; j <= last; ++j) row[j] = (row[j] - th) >= 0.0f ? 1.0f : 0.0f;
    std::memset(row + last + 1, 0, sizeof(float) * (W - last - 1));
  }
}

// SFSA backward through the threshold, in place on a block g_attn [BH, R, W] (rows and keys as above) given
// the recomputed scores: g_scores = g_attn * surrogate'(score - theta) on the causal part, 0 above it.
// g_theta_rows [BH * R] gets the row sums of -g_scores.
void sfsa_threshold_backward(float* g_attn, const float* scores, const float* theta, float* g_theta_rows,
                             int64_t BH, int64_t R, int64_t W, int64_t row0, int surrogate, float alpha,
                             int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < BH * R; ++r) {
    const int64_t bh = r / R, last = std::min(W - 1, row0 + r % R);
    const float th = theta[bh];
    float* g = g_attn + r * W;
    const float* s = scores + r * W;
    float acc = 0.0f;
    if (surrogate == 0) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j <= last; ++j) {
        g[j] *= surrogate_grad(s[j] - th, 0, alpha);
        acc += g[j];
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j <= last; ++j) {
        g[j] *= surrogate_grad(s[j] - th, 1, alpha);
        acc += g[j];
      }
    }
    std::memset(g + last + 1, 0, sizeof(float) * (W - last - 1));
    g_theta_rows[r] = -acc;
  }
}

}  // extern "C"

namespace {

// The KD rows below are compiled with -ffast-math, which assumes finite values: -inf is never used as a mask.
constexpr float kMasked = -1e30f;     // a logit whose exp is 0 at any temperature; stands in for a removed token
constexpr double kTailFloor = 1e-10;  // pipeline.kd_targets.TAIL_FLOOR

// log(e^x + e^y) without overflow or log(0): both terms may underflow at small tau.
inline float log_add_exp(float x, float y) { return std::max(x, y) + std::log1p(std::exp(-std::fabs(x - y))); }

inline float row_max(const float* zr, int64_t V) {
  float m = zr[0];
  for (int64_t j = 1; j < V; ++j) m = std::max(m, zr[j]);
  return m;
}

// One row of kd_dense_rows (below); KIND and the presence of a teacher are compile-time so the loops vectorise.
// Every log-probability is formed from a logit shifted by its row maximum, (z - max) / tau - log(sum), never as
// z / tau - logsumexp(z / tau): at small tau the latter loses |z| / tau * eps to cancellation.
template <int KIND, bool TEACHER>
void kd_row(float* zr, const float* tr, int64_t label, int64_t V, float tau, float beta, float g_kd, float g_ce,
            bool want_grad, float* kd_out, float* ce_out) {
  const float inv_tau = 1.0f / tau, lb = std::log(beta), l1b = std::log(1.0f - beta);
  const float mz = row_max(zr, V), mt = TEACHER ? row_max(tr, V) : 0.0f;
  float sz = 0.0f, ss = 0.0f, st = 0.0f;
#pragma omp simd reduction(+ : sz, ss)
  for (int64_t j = 0; j < V; ++j) {
    sz += std::exp(zr[j] - mz);
    ss += std::exp((zr[j] - mz) * inv_tau);
  }
  if (TEACHER) {
#pragma omp simd reduction(+ : st)
    for (int64_t j = 0; j < V; ++j) st += std::exp((tr[j] - mt) * inv_tau);
  }
  const float log_sz = std::log(sz), log_ss = std::log(ss), log_st = std::log(st);
  *ce_out = log_sz - (zr[label] - mz);
  float div = 0.0f, pg = 0.0f;
  if (TEACHER) {
#pragma omp simd reduction(+ : div, pg)
    for (int64_t j = 0; j < V; ++j) {
      const float lp = (zr[j] - mz) * inv_tau - log_ss, lq = (tr[j] - mt) * inv_tau - log_st;
      const float p = std::exp(lp), q = std::exp(lq);
      if (KIND == 0) {
        div += q > 0.0f ? q * (lq - lp) : 0.0f;
      } else if (KIND == 1) {
        div += p > 0.0f ? p * (lp - lq) : 0.0f;
      } else {
        const float lm = log_add_exp(lq + lb, lp + l1b);
        div += (q > 0.0f ? beta * q * (lq - lm) : 0.0f) + (p > 0.0f ? (1.0f - beta) * p * (lp - lm) : 0.0f);
        pg += p > 0.0f ? p * (1.0f - beta) * (lp - lm) : 0.0f;
      }
    }
  }
  *kd_out = tau * tau * div;
  if (!want_grad) return;
  // d(tau^2 D)/dz = tau dD/ds; forward KL p - q, reverse KL p (lp - lq - D), JSD p (g - sum p g)
  const float ckd = g_kd * tau;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float lp = (zr[j] - mz) * inv_tau - log_ss, p = std::exp(lp);
    float dkd = 0.0f;
    if (TEACHER) {
      const float lq = (tr[j] - mt) * inv_tau - log_st;
      if (KIND == 0) {
        dkd = p - std::exp(lq);
      } else if (KIND == 1) {
        dkd = p > 0.0f ? p * (lp - lq - div) : 0.0f;
      } else {
        const float lm = log_add_exp(lq + lb, lp + l1b);
        dkd = p > 0.0f ? p * ((1.0f - beta) * (lp - lm) - pg) : 0.0f;
      }
    }
    zr[j] = ckd * dkd + g_ce * std::exp(zr[j] - mz - log_sz);
  }
  zr[label] -= g_ce;
}

// Divergence D between the student's and the teacher's bucket distributions (log-probabilities lP, lQ [K], in
// double) and the per-bucket gradient coefficient c_b with dD/ds_j = p_j c_b(j) for every token j of bucket b
// (s = z / tau). Forward KL: c_b = 1 - Q_b / P_b, returned as lQ_b - lP_b in c (the caller keeps it in log
// form for the tail); reverse KL: c_b = lP_b - lQ_b - D; JSD: c_b = G_b - sum P G, G = (1 - beta)(lP - lM).
template <int KIND>
double bucket_divergence(const double* lP, const double* lQ, int64_t K, double beta, double* c) {
  double div = 0.0;
  if (KIND == 0) {
    for (int64_t b = 0; b < K; ++b) {
      const double q = std::exp(lQ[b]);
      div += q > 0.0 ? q * (lQ[b] - lP[b]) : 0.0;
      c[b] = lQ[b] - lP[b];
    }
  } else if (KIND == 1) {
    for (int64_t b = 0; b < K; ++b) {
      const double p = std::exp(lP[b]);
      div += p > 0.0 ? p * (lP[b] - lQ[b]) : 0.0;
    }
    for (int64_t b = 0; b < K; ++b) c[b] = lP[b] - lQ[b] - div;
  } else {
    const double lb = std::log(beta), l1b = std::log(1.0 - beta);
    double pg = 0.0;
    for (int64_t b = 0; b < K; ++b) {
      const double p = std::exp(lP[b]), q = std::exp(lQ[b]);
      const double x = lQ[b] + lb, y = lP[b] + l1b, lm = std::max(x, y) + std::log1p(std::exp(-std::fabs(x - y)));
      c[b] = (1.0 - beta) * (lP[b] - lm);
      div += (q > 0.0 ? beta * q * (lQ[b] - lm) : 0.0) + (p > 0.0 ? p * c[b] : 0.0);
      pg += p > 0.0 ? p * c[b] : 0.0;
    }
    for (int64_t b = 0; b < K; ++b) c[b] -= pg;
  }
  return div;
}

// One row of kd_sparse_rows (below). Buckets: the k stored ids, then (when k < V) the tail = every other token.
// The targets are the teacher at temperature tau (teachers.cache.topk_targets): lQ = its stored log-probabilities
// and log tail mass, renormalised over the buckets. The student is tempered before bucketing, as in
// pipeline.losses' _sparse_buckets: p = softmax(z / tau) over the whole row, lP_i = log p at id i, lP_tail = log of
// p's mass outside the ids. The k ids are set to kMasked (k writes, no copy of the row) while two passes run over
// the rest, the tail: its maximum mt, then its exp-sums at temperature 1 (for CE's softmax) and at tau, the latter
// shifted by mt so that it is >= 1 and cannot underflow at small tau (the tail mass is a direct sum, never
// 1 - sum(top-k)); a third pass writes the gradient, and then the ids are written. work: 4 (k + 1) doubles and
// k floats of scratch.
template <int KIND>
void kd_sparse_row(float* zr, const int64_t* ids, const float* logprobs, float tail_mass, int64_t label, int64_t V,
                   int64_t k, float tau, float beta, float g_kd, float g_ce, bool want_grad, float* kd_out,
                   float* ce_out, double* work, float* zid) {
  const float inv_tau_f = 1.0f / tau;
  const double inv_tau = 1.0 / static_cast<double>(tau);
  const bool has_tail = k < V;
  const int64_t K = has_tail ? k + 1 : k;
  double *lP = work, *lQ = work + (k + 1), *c = work + 2 * (k + 1), *ez_id = work + 3 * (k + 1);
  const float z_label = zr[label];
  for (int64_t i = 0; i < k; ++i) zid[i] = zr[ids[i]];
  for (int64_t i = 0; i < k; ++i) zr[ids[i]] = kMasked;
  const float mt = row_max(zr, V);  // the tail's maximum (kMasked when there is no tail)
  float mz = mt;
  for (int64_t i = 0; i < k; ++i) mz = std::max(mz, zid[i]);
  float sz_tail = 0.0f, ss_tail = 0.0f;  // sum over the tail of exp(z - mz) and of exp((z - mt) / tau)
#pragma omp simd reduction(+ : sz_tail, ss_tail)
  for (int64_t j = 0; j < V; ++j) {
    sz_tail += std::exp(zr[j] - mz);
    ss_tail += std::exp((zr[j] - mt) * inv_tau_f);
  }
  const double log_ss_tail = has_tail ? (static_cast<double>(mt) - mz) * inv_tau + std::log(ss_tail) : -1e300;
  double sz = has_tail ? sz_tail : 0.0, ss = has_tail ? std::exp(log_ss_tail) : 0.0;
  for (int64_t i = 0; i < k; ++i) {
    ez_id[i] = std::exp(static_cast<double>(zid[i]) - mz);
    sz += ez_id[i];
    ss += std::exp((static_cast<double>(zid[i]) - mz) * inv_tau);
  }
  const double log_sz = std::log(sz), log_ss = std::log(ss);  // ss >= 1: the maximum's term is 1
  *ce_out = static_cast<float>(log_sz - (static_cast<double>(z_label) - mz));
  // student: tempered log-probabilities of the ids and of the tail (log_ss_tail: a finite stand-in for -inf
  // without a tail, keeping exp() at exactly 0 under -ffast-math)
  for (int64_t i = 0; i < k; ++i) lP[i] = (static_cast<double>(zid[i]) - mz) * inv_tau - log_ss;
  if (has_tail) lP[k] = log_ss_tail - log_ss;
  // teacher: the stored log-probabilities (already at tau) and log tail mass, renormalised over the buckets
  double mq = -1e300;
  for (int64_t i = 0; i < k; ++i) mq = std::max(mq, lQ[i] = static_cast<double>(logprobs[i]));
  if (has_tail) mq = std::max(mq, lQ[k] = std::log(std::max(static_cast<double>(tail_mass), kTailFloor)));
  double sq = 0.0;
  for (int64_t b = 0; b < K; ++b) sq += std::exp(lQ[b] - mq);
  const double lse_q = mq + std::log(sq);
  for (int64_t b = 0; b < K; ++b) lQ[b] -= lse_q;
  const double div = bucket_divergence<KIND>(lP, lQ, K, beta, c);
  *kd_out = static_cast<float>(static_cast<double>(tau) * tau * div);
  if (want_grad) {
    // e_b = dD/du_b for bucket logits u (P = softmax(u)): P_b - Q_b (forward KL), P_b c_b (reverse KL, JSD).
    // P_b = sum of p over bucket b, so d(tau^2 D)/dz_j = tau e_b(j) p_j / P_b(j): e_i on id i, and on a tail
    // token e_tail exp((z_j - mt) / tau) / ss_tail
    for (int64_t b = 0; b < K; ++b) {
      const double p = std::exp(lP[b]);
      c[b] = KIND == 0 ? p - std::exp(lQ[b]) : p * c[b];
    }
    const double ckd = static_cast<double>(g_kd) * tau;
    const float cs = static_cast<float>(g_ce / sz);
    const float ct = has_tail ? static_cast<float>(ckd * c[k] / ss_tail) : 0.0f;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) zr[j] = ct * std::exp((zr[j] - mt) * inv_tau_f) + cs * std::exp(zr[j] - mz);
    // the k ids: CE's softmax, then each bucket's KD term added (a repeated id gets both)
    for (int64_t i = 0; i < k; ++i) zr[ids[i]] = static_cast<float>(g_ce * ez_id[i] / sz);
    for (int64_t i = 0; i < k; ++i) zr[ids[i]] += static_cast<float>(ckd * c[i]);
    zr[label] -= g_ce;
  } else {
    for (int64_t i = 0; i < k; ++i) zr[ids[i]] = zid[i];
  }
}

}  // namespace

extern "C" {

// Dense-teacher KD + CE for rows of logits, one row per OpenMP task, four passes over a row held in cache.
// z [n, V] student logits (overwritten with d loss / d z when want_grad), t [n, V] teacher logits (null: CE only),
// labels [n] (-100: row ignored, its loss and gradient 0). kind 0 = forward KL, 1 = reverse KL, 2 = JSD(beta),
// all tau^2-scaled as in pipeline.losses.kd_loss; loss = g_kd * sum kd + g_ce * sum ce. Writes kd_rows [n],
// ce_rows [n].
void kd_dense_rows(float* z, const float* t, const int64_t* labels, int64_t n, int64_t V, int kind, float tau,
                   float beta, float g_kd, float g_ce, int want_grad, float* kd_rows, float* ce_rows, int nthreads) {
  using Fn = void (*)(float*, const float*, int64_t, int64_t, float, float, float, float, bool, float*, float*);
  static const Fn table[6] = {kd_row<0, false>, kd_row<1, false>, kd_row<2, false>,
                              kd_row<0, true>,  kd_row<1, true>,  kd_row<2, true>};
  const Fn row = table[(t ? 3 : 0) + kind];
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
  for (int64_t r = 0; r < n; ++r) {
    float* zr = z + r * V;
    if (labels[r] == -100) {
      kd_rows[r] = ce_rows[r] = 0.0f;
      if (want_grad) std::memset(zr, 0, sizeof(float) * V);
      continue;
    }
    row(zr, t ? t + r * V : nullptr, labels[r], V, tau, beta, g_kd, g_ce, want_grad != 0, kd_rows + r, ce_rows + r);
  }
}

// Sparse top-k KD + CE for rows of logits (pipeline.losses.kd_loss's bucket semantics: the tempered student and
// teacher on the k stored ids plus one tail bucket when k < V). z [n, V] (overwritten with d loss / d z when
// want_grad); ids [n, k] int64; logprobs [n, k] teacher log softmax(t / tau) of the ids; tail_mass [n] the rest of
// softmax(t / tau)'s mass; labels [n] (-100: row ignored).
// kind, tau, beta, g_kd, g_ce as in kd_dense_rows. Writes kd_rows [n], ce_rows [n].
void kd_sparse_rows(float* z, const int64_t* ids, const float* logprobs, const float* tail_mass,
                    const int64_t* labels, int64_t n, int64_t V, int64_t k, int kind, float tau, float beta,
                    float g_kd, float g_ce, int want_grad, float* kd_rows, float* ce_rows, int nthreads) {
  using Fn = void (*)(float*, const int64_t*, const float*, float, int64_t, int64_t, int64_t, float, float, float,
                      float, bool, float*, float*, double*, float*);
  static const Fn table[3] = {kd_sparse_row<0>, kd_sparse_row<1>, kd_sparse_row<2>};
  const Fn row = table[kind];
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<double> work(static_cast<size_t>(4 * (k + 1)));
    std::vector<float> zid(static_cast<size_t>(k + 1));
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < n; ++r) {
      float* zr = z + r * V;
      if (labels[r] == -100) {
        kd_rows[r] = ce_rows[r] = 0.0f;
        if (want_grad) std::memset(zr, 0, sizeof(float) * V);
        continue;
      }
      row(zr, ids + r * k, logprobs + r * k, tail_mass[r], labels[r], V, k, tau, beta, g_kd, g_ce, want_grad != 0,
          kd_rows + r, ce_rows + r, work.data(), zid.data());
    }
  }
}

}  // extern "C"
