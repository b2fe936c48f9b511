// The LIF charge shared by spike_ops.cpp and fused_ops.cpp, in spikingjelly's order of float operations
// (students/ops/lif/reference.py, `charge`):
//   decay_input: H = V + (X - V) / tau          otherwise: H = V * (1 - 1/tau) + X
// rounded exactly as PyTorch rounds it in float32, whatever -ffast-math does to a float division (a multiply by
// the reciprocal) or to a float multiply followed by an add (one fused multiply-add: one rounding, not two):
//   - kDecayPow2 (tau a power of two, SpikeGPT's 2): 1/tau is exact, so (X - V) * (1/tau) is the quotient;
//   - kDecay: (X - V) * (1/tau) formed in double and rounded once to float. It is within 2^-52 (relative) of
//     the quotient, and a quotient of two floats never lies within 2^-49 of a midpoint between two floats (it
//     would need 25 significant bits), so both round to the same float;
//   - kNoDecay: V * beta formed in double (exact: a product of two floats) and rounded once, then + X.
// The kind is a template argument: a run-time choice inside the lane loops costs a third of their speed.
#pragma once

#include <type_traits>

enum ChargeKind { kDecayPow2 = 0, kDecay = 1, kNoDecay = 2 };

struct LifCharge {
  double inv_tau;  // 1 / tau, with tau first rounded to float (PyTorch divides a float32 tensor by float(tau))
  double beta;     // 1 - 1/tau rounded to float (PyTorch multiplies by the scalar rounded to float32)
};

template <int KIND>
inline float lif_charge(float v, float x, const LifCharge& c) {
  if (KIND == kNoDecay) return static_cast<float>(static_cast<double>(v) * c.beta) + x;
  const float d = x - v;
  if (KIND == kDecayPow2) return v + d * static_cast<float>(c.inv_tau);
  return v + static_cast<float>(static_cast<double>(d) * c.inv_tau);
}

// Backward of lif_charge as autograd runs the reference: given g = d loss / d H, writes d loss / d X and
// d loss / d V. decay_input: gx = g / tau, gv = g - g / tau; otherwise gx = g, gv = g * beta.
template <int KIND>
inline void lif_charge_grad(float g, const LifCharge& c, float& gx, float& gv) {
  if (KIND == kNoDecay) {
    gx = g;
    gv = static_cast<float>(static_cast<double>(g) * c.beta);
    return;
  }
  gx = KIND == kDecayPow2 ? g * static_cast<float>(c.inv_tau) : static_cast<float>(static_cast<double>(g) * c.inv_tau);
  gv = g - gx;
}

// Calls f(std::integral_constant<int, kind>{}) for a run-time kind (0, 1 or 2).
template <class F>
inline void with_charge_kind(int kind, F f) {
  switch (kind) {
    case kDecayPow2: f(std::integral_constant<int, kDecayPow2>{}); break;
    case kDecay: f(std::integral_constant<int, kDecay>{}); break;
    default: f(std::integral_constant<int, kNoDecay>{}); break;
  }
}
