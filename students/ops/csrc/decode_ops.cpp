// One decode step of a spike-driven SpikeGPT student with srwkv blocks and T = 1 in one call
// (students/ops/decode_step): embedding -> ln0 -> blocks -> ln_out -> head LIF -> event-driven head. Inference
// only, fp32, batch rows independent. Every Linear reads spikes, so each is a gather-add of the rows of its W^T
// picked by the spikes (as sparse_ops.cpp), here without a call per layer. The other ops follow the module
// path's arithmetic: LayerNorm as torch's CPU kernel forms it ((x * rstd - rstd * mean) * gamma + beta), the LIF
// charge of lif_charge.h, the token shift, sigmoid gate and relu^2 currents of fused_ops.cpp and the running-max
// WKV step of spike_ops.cpp's wkv_forward; so the step equals the module path up to float summation order
// (LayerNorm moments, Linears). The recurrent state is updated in place. Plain C ABI, loaded through ctypes with
// the other kernels (students/ops/csrc/__init__.py); decode_step/cpu.py mirrors the structs below in ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lif_charge.h"

extern "C" {

struct DecodeLif {  // one LIF layer: charge (lif_charge.h: kind, 1/tau, beta), threshold, reset
  double inv_tau, beta;
  int32_t kind, soft;
  float vth;
};

struct SrwkvBlock {
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;                      // [C]
  const float *att_mix, *ffn_mix;                                   // token shift mix [3, C], [2, C]
  const float *att_key, *att_value, *att_receptance, *att_output;   // W^T [C, C]
  const float *decay, *bonus;                                       // w = -exp(time_decay), u = time_first [C]
  const float *ffn_key, *ffn_receptance, *ffn_value;                // W^T [C, F], [C, C], [F, C]
  DecodeLif att_in, att_out, mixer, ffn_in, ffn_hidden, ffn_out;   // widths 3C, C, C, 2C, F, C
  // recurrent state [B, width], updated in place: token-shift inputs, LIF membranes, WKV (num, den, max_exp)
  float *att_prev, *v_att_in, *num, *den, *pmax, *v_att_out, *v_mixer;
  float *ffn_prev, *v_ffn_in, *v_hidden, *v_ffn_out;
};

struct DecodeModel {
  int64_t n_layer, C, F, V;
  int32_t binary_embedding;
  float eps;                                                        // every LayerNorm's
  const float *emb;                                                 // [V, C]
  const float *ln0_w, *ln0_b, *ln_out_w, *ln_out_b;                 // [C]
  const float *head;                                                // W^T [C, V]
  DecodeLif head_lif;
  float* v_head;                                                    // [B, C], in place
  const SrwkvBlock* blocks;                                         // [n_layer]
};

}  // extern "C"

namespace {

// Output columns summed together, held in SIMD registers while the active rows stream past (as sparse_ops.cpp).
#ifdef __AVX512F__
constexpr int64_t kVecs = 8;
#else
constexpr int64_t kVecs = 4;
#endif
constexpr int64_t kTile = 16 * kVecs;
constexpr int64_t kAddsPerThread = 1 << 18;  // head adds per OpenMP thread below which fewer threads run
typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// y[c0 : c0 + w] = sum over the n events e of wt[idx[e], c0 : c0 + w], rows `out` apart, in event order.
inline void gather_columns(const float* wt, int64_t out, const int32_t* idx, int64_t n, int64_t c0, int64_t w,
                           float* y) {
  if (w == kTile) {
    f32x16 acc[kVecs] = {};
    for (int64_t e = 0; e < n; ++e) {
      const float* row = wt + static_cast<int64_t>(idx[e]) * out + c0;
#pragma GCC unroll 8
      for (int64_t v = 0; v < kVecs; ++v) acc[v] += load16(row + 16 * v);
    }
    std::memcpy(y + c0, acc, sizeof acc);
    return;
  }
  for (int64_t j = 0; j < w; ++j) y[c0 + j] = 0.0f;
  for (int64_t e = 0; e < n; ++e) {
    const float* row = wt + static_cast<int64_t>(idx[e]) * out + c0;
    for (int64_t j = 0; j < w; ++j) y[c0 + j] += row[j];
  }
}

// y [out] = x W^T for the binary x whose active inputs are idx[0:n]: the gather-add, one thread.
inline void gather(const float* wt, int64_t out, const int32_t* idx, int64_t n, float* y) {
  for (int64_t c0 = 0; c0 < out; c0 += kTile) gather_columns(wt, out, idx, n, c0, std::min(kTile, out - c0), y);
}

// torch's CPU LayerNorm: moments of the row, then (x * rstd + (-rstd * mean)) * gamma + beta. The moments are
// summed in double (torch: float), a difference of float summation order only.
void layer_norm(const float* x, const float* gamma, const float* beta, int64_t n, float eps, float* y) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  const double mean = sum / n;
  double sq = 0.0;
  for (int64_t j = 0; j < n; ++j) sq += (x[j] - mean) * (x[j] - mean);
  const float mean_f = static_cast<float>(mean);
  const float rstd = 1.0f / std::sqrt(static_cast<float>(sq / n) + eps);
  const float shift = -rstd * mean_f;
  for (int64_t j = 0; j < n; ++j) y[j] = (x[j] * rstd + shift) * gamma[j] + beta[j];
}

// n LIF neurons, one step: charge the membranes v with the currents x, fire, reset (in place). Writes the
// indices of the neurons that fired to idx (and 0/1 to spikes when given); returns their count.
template <int KIND>
int64_t fire_t(const float* x, float* v, int64_t n, const DecodeLif& p, int32_t* idx, float* spikes) {
  const LifCharge c{p.inv_tau, p.beta};
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float h = lif_charge<KIND>(v[j], x[j], c);
    const float s = static_cast<float>(h - p.vth >= 0.0f);
    v[j] = p.soft ? h - s * p.vth : h * (1.0f - s);
    if (spikes) spikes[j] = s;
    idx[count] = static_cast<int32_t>(j);
    count += s != 0.0f;
  }
  return count;
}

int64_t fire(const float* x, float* v, int64_t n, const DecodeLif& p, int32_t* idx, float* spikes = nullptr) {
  switch (p.kind) {
    case kDecayPow2: return fire_t<kDecayPow2>(x, v, n, p, idx, spikes);
    case kDecay: return fire_t<kDecay>(x, v, n, p, idx, spikes);
    default: return fire_t<kNoDecay>(x, v, n, p, idx, spikes);
  }
}

// Token shift of K branches: current[k*C + j] = prev[j] + mix[k, j] (h[j] - prev[j]); then prev = h.
void token_shift(const float* h, const float* mix, int64_t K, int64_t C, float* prev, float* current) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < C; ++j) current[k * C + j] = prev[j] + mix[k * C + j] * (h[j] - prev[j]);
  std::memcpy(prev, h, sizeof(float) * C);
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// (e^{a - m}, e^{b - m}) with m = max(a, b), using one exp: the larger side is exactly 1 (spike_ops.cpp).
inline void max_pair(float a, float b, float& ea, float& eb) {
  const float e = std::exp(-std::fabs(a - b));
  ea = a >= b ? 1.0f : e;
  eb = a >= b ? e : 1.0f;
}

// One WKV step (spike_ops.cpp: wkv_forward's loop body) for C channels: y from the state, then the update.
void wkv_step(const float* w, const float* u, const float* k, const float* v, float* num, float* den, float* p,
              int64_t C, float* y) {
  for (int64_t j = 0; j < C; ++j) {
    const float kt = k[j], vt = v[j], uk = u[j] + kt;
    float e1, e2;
    max_pair(p[j], uk, e1, e2);
    y[j] = (e1 * num[j] + e2 * vt) / (e1 * den[j] + e2);
    const float pw = p[j] + w[j];
    max_pair(pw, kt, e1, e2);
    num[j] = e1 * num[j] + e2 * vt;
    den[j] = e1 * den[j] + e2;
    p[j] = std::max(pw, kt);
  }
}

// Work buffers of one row (C channels, F hidden).
struct Scratch {
  std::vector<float> h, cur, k, v, r, y, hid;
  std::vector<int32_t> idx;
  Scratch(int64_t C, int64_t F)
      : h(C), cur(std::max(3 * C, F)), k(C), v(C), r(std::max(C, F)), y(C), hid(F), idx(std::max(3 * C, F)) {}
};

// x += the block's two spike outputs, for one row: the srwkv mixer then the spiking FFN (layers.py).
void srwkv_block(const SrwkvBlock& b, int64_t row, int64_t C, int64_t F, float eps, float* x, Scratch& s) {
  float* cur = s.cur.data();
  int32_t* idx = s.idx.data();
  // mixer: LIF(token shift of LN1(x)) -> W_k, W_v, W_r; WKV; LIF(sigmoid(r) * wkv) -> W_o; LIF -> residual
  layer_norm(x, b.ln1_w, b.ln1_b, C, eps, s.h.data());
  token_shift(s.h.data(), b.att_mix, 3, C, b.att_prev + row * C, cur);
  float* v_in = b.v_att_in + row * 3 * C;
  gather(b.att_key, C, idx, fire(cur, v_in, C, b.att_in, idx), s.k.data());
  gather(b.att_value, C, idx, fire(cur + C, v_in + C, C, b.att_in, idx), s.v.data());
  gather(b.att_receptance, C, idx, fire(cur + 2 * C, v_in + 2 * C, C, b.att_in, idx), s.r.data());
  wkv_step(b.decay, b.bonus, s.k.data(), s.v.data(), b.num + row * C, b.den + row * C, b.pmax + row * C, C,
           s.y.data());
  for (int64_t j = 0; j < C; ++j) cur[j] = sigmoid(s.r[j]) * s.y[j];
  gather(b.att_output, C, idx, fire(cur, b.v_att_out + row * C, C, b.att_out, idx), s.k.data());
  const int64_t fired = fire(s.k.data(), b.v_mixer + row * C, C, b.mixer, idx);
  for (int64_t e = 0; e < fired; ++e) x[idx[e]] += 1.0f;
  // FFN: LIF(token shift of LN2(x)) -> W_k -> LIF(relu^2) -> W_v; W_r; LIF(sigmoid(r) * value) -> residual
  layer_norm(x, b.ln2_w, b.ln2_b, C, eps, s.h.data());
  token_shift(s.h.data(), b.ffn_mix, 2, C, b.ffn_prev + row * C, cur);
  float* v_fin = b.v_ffn_in + row * 2 * C;
  gather(b.ffn_receptance, C, idx, fire(cur + C, v_fin + C, C, b.ffn_in, idx), s.r.data());
  gather(b.ffn_key, F, idx, fire(cur, v_fin, C, b.ffn_in, idx), s.hid.data());
  for (int64_t j = 0; j < F; ++j) {
    const float z = std::max(s.hid[j], 0.0f);
    cur[j] = z * z;
  }
  gather(b.ffn_value, C, idx, fire(cur, b.v_hidden + row * F, F, b.ffn_hidden, idx), s.v.data());
  for (int64_t j = 0; j < C; ++j) cur[j] = sigmoid(s.r[j]) * s.v[j];
  const int64_t out = fire(cur, b.v_ffn_out + row * C, C, b.ffn_out, idx);
  for (int64_t e = 0; e < out; ++e) x[idx[e]] += 1.0f;
}

// The head's spikes for one row: embedding -> ln0 -> blocks -> ln_out -> LIF. Writes spikes [C] and the
// indices of the active ones; returns their count.
int64_t body_row(const DecodeModel& m, int64_t row, int64_t token, float* spikes, int32_t* idx, Scratch& s) {
  const int64_t C = m.C;
  std::vector<float> x(C);
  const float* e = m.emb + token * C;
  for (int64_t j = 0; j < C; ++j) s.h[j] = m.binary_embedding ? static_cast<float>(e[j] >= 0.0f) : e[j];
  layer_norm(s.h.data(), m.ln0_w, m.ln0_b, C, m.eps, x.data());
  for (int64_t l = 0; l < m.n_layer; ++l) srwkv_block(m.blocks[l], row, C, m.F, m.eps, x.data(), s);
  layer_norm(x.data(), m.ln_out_w, m.ln_out_b, C, m.eps, s.h.data());
  return fire(s.h.data(), m.v_head + row * C, C, m.head_lif, idx, spikes);
}

}  // namespace

extern "C" {

// One decode step for B rows. tokens [B] int64 -> head_spikes [B, C] (the head's binary input) and, when the
// head's firing rate is at most head_max_rate, logits [B, V] = head_spikes W_head^T by the gather-add (OpenMP
// over column tiles: at most nthreads threads, one per kAddsPerThread adds). Returns 0 when the logits are
// written; 1 when the rate is above head_max_rate (the state has advanced and head_spikes is written: the
// caller runs the dense head); 2 when a token is outside [0, V) (nothing is written).
int decode_step(const DecodeModel* m, const int64_t* tokens, int64_t B, float* logits, float* head_spikes,
                double head_max_rate, int nthreads) {
  const int64_t C = m->C, V = m->V;
  for (int64_t b = 0; b < B; ++b)
    if (tokens[b] < 0 || tokens[b] >= V) return 2;
  Scratch s(C, m->F);
  std::vector<int32_t> idx(B * C);
  std::vector<int64_t> counts(B);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    counts[b] = body_row(*m, b, tokens[b], head_spikes + b * C, idx.data() + b * C, s);
    total += counts[b];
  }
  if (static_cast<double>(total) > head_max_rate * static_cast<double>(B * C)) return 1;
  const int64_t tiles = (V + kTile - 1) / kTile;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, total * V / kAddsPerThread)));
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t c0 = t * kTile, w = std::min(kTile, V - c0);
    for (int64_t b = 0; b < B; ++b)
      gather_columns(m->head, V, idx.data() + b * C, counts[b], c0, w, logits + b * V);
  }
  return 0;
}

}  // extern "C"
