// One reverse-diffusion step (DDIM or DDPM, any prediction type) over float32 arrays, in one pass.
//
// Every sampler step the runtime supports is the same element-wise form once its float64 coefficients are known
// (diffseg/runtime/diffusion_steps.py derives them from the ᾱ table, with the papers' equations):
//
//   m      = model_output · scale            (scale: the blend's 1/Σweights, optional, repeats every `period`)
//   x0     = a_out·m + a_x·x_t               (the predicted x0)
//   x0c    = clamp(x0, −clip, clip)          (when clipping)
//   x_prev = A·x0c + B·m + C·x_t + σ·z       (σ: a constant, or exp(L1·v + L0) from a learned-variance channel v)
//
// Each element is widened to double, stepped and rounded to float32 once: x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ cancels terms
// ~160 times larger than the result at t = 999, too much for float32 arithmetic. Elements are independent, so the
// result does not depend on the thread count; x_prev may be x_t itself (each element is read before it is written).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "diffseg/parallel.hpp"

namespace diffseg {
namespace step {

enum class Noise { none, constant, learned };

struct Coefficients {
    double a_out = 0, a_x = 0;  // x0 = a_out·m + a_x·x_t
    bool clip = false;
    double clip_range = 1;
    double A = 0, B = 0, C = 0;  // x_prev = A·x0c + B·m + C·x_t (+ noise term)
    Noise noise = Noise::none;
    double sigma = 0;          // Noise::constant
    double L1 = 0, L0 = 0;     // Noise::learned: σ = exp(L1·v + L0)
};

struct Arrays {
    const float* model_output = nullptr;
    const float* x_t = nullptr;
    const float* scale = nullptr;     // optional, length `period`
    std::int64_t period = 0;
    const float* noise = nullptr;     // Noise::constant / learned
    const float* variance = nullptr;  // Noise::learned
    float* x_prev = nullptr;          // optional
    float* x0 = nullptr;              // optional: the clipped x0
    std::int64_t n = 0;
};

namespace detail {

// Elements [begin, end) whose scale factors are scale[0 .. end - begin) (null: 1). Branch-free per element (the
// clamp is min/max: clipped x0 sits at ±1 for much of a volume, where a compare-and-branch mispredicts), so the
// compiler can vectorise the loop. No pointer is __restrict: an output may be an input (x_prev = x_t in place, x0 =
// model_output), so element i reads all its inputs before it writes either output.
template <bool Clip, Noise Kind, bool Scaled, bool WriteX0, bool WritePrev>
void run_segment(const Coefficients& c, const Arrays& a, const float* scale, std::int64_t begin, std::int64_t end) {
    const double lo = -c.clip_range, hi = c.clip_range;
    const float* out = a.model_output;
    const float* xt_in = a.x_t;
    for (std::int64_t i = begin; i < end; ++i) {
        double m = out[i];
        if constexpr (Scaled) m *= static_cast<double>(scale[i - begin]);
        const double xt = xt_in[i];
        double x0 = c.a_out * m + c.a_x * xt;
        if constexpr (Clip) x0 = std::min(std::max(x0, lo), hi);
        double next = 0;
        if constexpr (WritePrev) {
            next = c.A * x0 + c.B * m + c.C * xt;
            if constexpr (Kind == Noise::constant) next += c.sigma * static_cast<double>(a.noise[i]);
            if constexpr (Kind == Noise::learned)
                next += std::exp(c.L1 * static_cast<double>(a.variance[i]) + c.L0) * static_cast<double>(a.noise[i]);
        }
        if constexpr (WriteX0) a.x0[i] = static_cast<float>(x0);
        if constexpr (WritePrev) a.x_prev[i] = static_cast<float>(next);
    }
}

// [begin, end) cut where the scale array (of length a.period, repeating) wraps.
template <bool Clip, Noise Kind, bool WriteX0, bool WritePrev>
void run_range(const Coefficients& c, const Arrays& a, std::int64_t begin, std::int64_t end) {
    if (!a.scale) return run_segment<Clip, Kind, false, WriteX0, WritePrev>(c, a, nullptr, begin, end);
    for (std::int64_t i = begin; i < end;) {
        const std::int64_t j = i % a.period;
        const std::int64_t stop = std::min(end, i + (a.period - j));
        run_segment<Clip, Kind, true, WriteX0, WritePrev>(c, a, a.scale + j, i, stop);
        i = stop;
    }
}

template <bool Clip, Noise Kind>
void run_outputs(const Coefficients& c, const Arrays& a, std::int64_t begin, std::int64_t end) {
    if (a.x0 && a.x_prev) return run_range<Clip, Kind, true, true>(c, a, begin, end);
    if (a.x0) return run_range<Clip, Kind, true, false>(c, a, begin, end);
    if (a.x_prev) return run_range<Clip, Kind, false, true>(c, a, begin, end);
}

template <bool Clip>
void run_noise(const Coefficients& c, const Arrays& a, std::int64_t begin, std::int64_t end) {
    switch (c.noise) {
        case Noise::none: return run_outputs<Clip, Noise::none>(c, a, begin, end);
        case Noise::constant: return run_outputs<Clip, Noise::constant>(c, a, begin, end);
        case Noise::learned: return run_outputs<Clip, Noise::learned>(c, a, begin, end);
    }
}

}  // namespace detail

// The step over a.n elements on `threads` threads (0: OpenMP's default), each taking one contiguous share.
inline void run(const Coefficients& c, const Arrays& a, int threads) {
    constexpr std::int64_t min_share = 1 << 16;  // below this, a thread costs more than it saves
    const int parts = resolve_threads(threads, (a.n + min_share - 1) / min_share);
#pragma omp parallel for schedule(static, 1) num_threads(parts) if (parts > 1)
    for (int part = 0; part < parts; ++part) {
        std::int64_t begin, end;
        split_range(a.n, parts, part, begin, end);
        if (c.clip)
            detail::run_noise<true>(c, a, begin, end);
        else
            detail::run_noise<false>(c, a, begin, end);
    }
}

}  // namespace step
}  // namespace diffseg
