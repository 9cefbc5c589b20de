// Resampling of a 3D image onto another grid, with SimpleITK's geometry and interpolation rules.
//
// Geometry: the caller gives both grids as ITK holds them: the output's index-to-physical matrix D_out·S_out
// and origin, and the input's physical-to-index matrix (D_in·S_in)^-1 and origin. The continuous input index
// of an output voxel is computed exactly as itk::ResampleImageFilter (ITK 5.4) does, operation for operation:
// per output row, c_start and c_end are the indices of x = 0 and x = size (physical point = origin + sum of
// column terms, then (D_in S_in)^-1 (p - O_in)), and voxel i gets c_start + (i / size)·(c_end - c_start). With
// the same interpolation arithmetic, results equal SimpleITK's to the bit for axis-aligned grids; for oblique
// ones the inverse matrix (ITK: SVD, ours: LU) may differ in its last bit. Arrays are C-ordered [z, y, x].
//
// Rules (as itk::ResampleImageFilter with LinearInterpolateImageFunction / NearestNeighborInterpolateImage-
// Function and no extrapolator):
//   * a point is inside iff -0.5 <= c < n - 0.5 on every axis (NaN is outside); outside points get `fill`;
//   * linear: per axis, i0 = max(floor(c), 0), w = c - i0; the axis is not interpolated (w = 0) when w <= 0 or
//     i0 + 1 is past the end, i.e. samples clamp to the edge voxel in the half-voxel border. Values are lerped in
//     double along x, then y, then z (a + (b - a)·w), and rounded to float32 once, so results equal ITK's up
//     to the last bit of the continuous index;
//   * nearest: index = floor(c + 0.5) (half-way cases round up);
//   * label vote: the 8 taps of the linear rule vote for their label with their trilinear weight; the label with
//     the largest total weight wins, ties go to the smallest label value.
//
// When M is diagonal (equal or flipped directions, any spacing, origin and size) the work is separable: per-axis
// (index, weight) tables, an x pass and a y pass per needed input slice into a small per-thread ring buffer,
// and a z lerp per output slice. Threads take blocks of output rows (y), so each thread's buffers stay in L2.
// Any other M (oblique, permuted axes) takes the general 8-tap path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
// SSSE3 kernels are compiled for that target and picked at run time (the portable build assumes only SSE2).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DIFFSEG_HAVE_SSSE3_DISPATCH 1
#include <tmmintrin.h>
#else
#define DIFFSEG_HAVE_SSSE3_DISPATCH 0
#endif

#include "diffseg/memory.hpp"
#include "diffseg/parallel.hpp"

namespace diffseg {
namespace rs {

struct Shape {
    std::int64_t nz = 0, ny = 0, nx = 0;
    std::int64_t voxels() const { return nz * ny * nx; }
    std::int64_t n(int axis_xyz) const { return axis_xyz == 0 ? nx : (axis_xyz == 1 ? ny : nz); }
};

// The index map of two grids (x, y, z order; matrices row-major), with ITK's order of operations.
struct IndexMap {
    double i2p[3][3];  // output index -> physical: D_out * diag(S_out)
    double o_out[3];   // output origin
    double p2i[3][3];  // physical -> input index: (D_in * diag(S_in))^-1
    double o_in[3];    // input origin
    bool separable;    // the composition p2i * i2p is diagonal (equal or flipped directions)

    // Continuous input index of output index (ix, iy, iz), as ImageBase::TransformIndexToPhysicalPoint and
    // TransformPhysicalPointToContinuousIndex compute it.
    void map(double ix, double iy, double iz, double c[3]) const {
        double p[3];
        for (int r = 0; r < 3; ++r) {
            double v = o_out[r];
            v += i2p[r][0] * ix;
            v += i2p[r][1] * iy;
            v += i2p[r][2] * iz;
            p[r] = v - o_in[r];
        }
        for (int r = 0; r < 3; ++r) {
            double v = 0.0;
            v += p2i[r][0] * p[0];
            v += p2i[r][1] * p[1];
            v += p2i[r][2] * p[2];
            c[r] = v;
        }
    }

    // Start index and step vector of output row (j, k): voxel i maps to start + (i / nx) * vec.
    void row(std::int64_t j, std::int64_t k, std::int64_t nx, double start[3], double vec[3]) const {
        double end[3];
        map(0.0, static_cast<double>(j), static_cast<double>(k), start);
        map(static_cast<double>(nx), static_cast<double>(j), static_cast<double>(k), end);
        for (int r = 0; r < 3; ++r) vec[r] = end[r] - start[r];
    }
};

inline bool inside_axis(double c, std::int64_t n) { return c >= -0.5 && c < static_cast<double>(n) - 0.5; }

// The linear rule along one axis: taps i0, i1 with weight w on i1 (w == 0: i1 == i0, one tap).
struct LinearTap {
    std::int64_t i0, i1;
    double w;
};

inline LinearTap linear_tap(double c, std::int64_t n) {
    std::int64_t i0 = static_cast<std::int64_t>(std::floor(c));
    if (i0 < 0) i0 = 0;
    double w = c - static_cast<double>(i0);
    std::int64_t i1 = i0 + 1;
    if (!(w > 0.0) || i1 > n - 1) {
        w = 0.0;
        i1 = i0;
    }
    return {i0, i1, w};
}

inline std::int64_t nearest_index(double c) { return static_cast<std::int64_t>(std::floor(c + 0.5)); }

// ------------------------------------------------------------------------------------- separable tables

struct AxisTable {
    std::int64_t lo = 0, hi = 0;  // output indices [lo, hi) are inside the input along this axis
    std::int64_t pair_lo = 0, pair_hi = 0;  // [pair_lo, pair_hi): i0 + 1 is inside too (both taps in one load)
    std::vector<std::int32_t> i0, i1, nearest;
    std::vector<double> w;
};

// Table for an output axis whose samples have continuous input indices c(o), o = 0..n_out-1, over an input axis
// of n_in samples. c must be monotone in o (it is, for any index map).
template <class C>
inline AxisTable make_axis_table(std::int64_t n_out, std::int64_t n_in, C&& c_of) {
    AxisTable t;
    t.i0.assign(static_cast<std::size_t>(n_out), 0);
    t.i1.assign(static_cast<std::size_t>(n_out), 0);
    t.nearest.assign(static_cast<std::size_t>(n_out), 0);
    t.w.assign(static_cast<std::size_t>(n_out), 0.0);
    std::int64_t lo = -1, hi = -1;
    for (std::int64_t o = 0; o < n_out; ++o) {
        const double c = c_of(o);
        if (!inside_axis(c, n_in)) continue;
        if (lo < 0) lo = o;
        hi = o + 1;
        const LinearTap tap = linear_tap(c, n_in);
        t.i0[o] = static_cast<std::int32_t>(tap.i0);
        t.i1[o] = static_cast<std::int32_t>(tap.i1);
        t.w[o] = tap.w;
        t.nearest[o] = static_cast<std::int32_t>(std::min<std::int64_t>(nearest_index(c), n_in - 1));
    }
    t.lo = lo < 0 ? 0 : lo;
    t.hi = lo < 0 ? 0 : hi;
    // i0 is monotone (decreasing on flipped axes), so the entries at the last input voxel form a prefix or a
    // suffix of [lo, hi).
    t.pair_lo = t.lo;
    while (t.pair_lo < t.hi && t.i0[t.pair_lo] + 1 >= n_in) ++t.pair_lo;
    t.pair_hi = t.pair_lo;
    while (t.pair_hi < t.hi && t.i0[t.pair_hi] + 1 < n_in) ++t.pair_hi;
    return t;
}

// The three tables of a separable map: x from the row start/step of row (0, 0) (ITK's scanline formula), y and
// z from the start of rows (j, 0) and (0, k). Exact when both matrices are diagonal (axis-aligned grids).
struct SeparableTables {
    AxisTable x, y, z;
};

inline SeparableTables make_tables(const IndexMap& map, Shape in, Shape os) {
    double start[3], vec[3];
    map.row(0, 0, os.nx, start, vec);
    const double nx = static_cast<double>(os.nx);
    SeparableTables t;
    t.x = make_axis_table(os.nx, in.nx,
                          [&](std::int64_t i) { return start[0] + (static_cast<double>(i) / nx) * vec[0]; });
    t.y = make_axis_table(os.ny, in.ny, [&](std::int64_t j) {
        double c[3];
        map.map(0.0, static_cast<double>(j), 0.0, c);
        return c[1];
    });
    t.z = make_axis_table(os.nz, in.nz, [&](std::int64_t k) {
        double c[3];
        map.map(0.0, 0.0, static_cast<double>(k), c);
        return c[2];
    });
    return t;
}

struct Workspace {
    std::vector<ScratchArray<double>> ring, xrows;
};

inline WorkspacePool<Workspace>& workspace_pool() {
    static WorkspacePool<Workspace> pool;
    return pool;
}

inline void check_shapes(const Shape& in, const Shape& out) {
    const std::int64_t lim = std::numeric_limits<std::int32_t>::max();
    if (in.nx > lim || in.ny > lim || in.nz > lim || out.nx > lim || out.ny > lim || out.nz > lim)
        throw std::invalid_argument("axes longer than 2^31 voxels are not supported");
}

template <class T>
inline void fill_n(T* p, std::int64_t n, T v) {
    if (n > 0) std::fill(p, p + n, v);
}

// ------------------------------------------------------------------------------------- linear, separable

#if defined(__SSE2__)
// Two neighbouring voxels p[0], p[1] as doubles (one load).
template <class T>
inline __m128d load_pair(const T* p);
template <>
inline __m128d load_pair<float>(const float* p) {
    std::int64_t bits;  // 8 bytes at 4-byte alignment: memcpy, not a (misaligned) double load
    std::memcpy(&bits, p, 8);
    return _mm_cvtps_pd(_mm_castsi128_ps(_mm_cvtsi64_si128(bits)));
}
template <>
inline __m128d load_pair<double>(const double* p) {
    return _mm_loadu_pd(p);
}
template <>
inline __m128d load_pair<std::int16_t>(const std::int16_t* p) {
    std::int32_t bits;
    std::memcpy(&bits, p, 4);
    const __m128i v = _mm_cvtsi32_si128(bits);
    return _mm_cvtepi32_pd(_mm_srai_epi32(_mm_unpacklo_epi16(v, v), 16));
}
template <>
inline __m128d load_pair<std::uint16_t>(const std::uint16_t* p) {
    std::int32_t bits;
    std::memcpy(&bits, p, 4);
    return _mm_cvtepi32_pd(_mm_unpacklo_epi16(_mm_cvtsi32_si128(bits), _mm_setzero_si128()));
}
template <>
inline __m128d load_pair<std::uint8_t>(const std::uint8_t* p) {
    std::uint16_t bits;
    std::memcpy(&bits, p, 2);
    const __m128i z = _mm_setzero_si128();
    const __m128i v = _mm_unpacklo_epi8(_mm_cvtsi32_si128(bits), z);
    return _mm_cvtepi32_pd(_mm_unpacklo_epi16(v, z));
}

// a + (b - a) * w, or a where w == 0 (ITK skips the axis there; this keeps NaN/inf neighbours out).
inline __m128d lerp2(__m128d a, __m128d b, __m128d w) {
    const __m128d r = _mm_add_pd(a, _mm_mul_pd(_mm_sub_pd(b, a), w));
    const __m128d zero_w = _mm_cmpeq_pd(w, _mm_setzero_pd());
    return _mm_or_pd(_mm_and_pd(zero_w, a), _mm_andnot_pd(zero_w, r));
}
#endif

// x pass of one input row: dst[i - lo] = lerp of row at the x table, for i in [lo, hi).
template <class Tin>
inline void lerp_row_x(const Tin* row, const AxisTable& tx, double* dst) {
    const std::int32_t* const i0 = tx.i0.data();
    const double* const w = tx.w.data();
    const std::int32_t* const i1 = tx.i1.data();
    const std::int64_t lo = tx.lo, hi = tx.hi, pair_lo = tx.pair_lo, pair_hi = tx.pair_hi;
    auto scalar = [&](std::int64_t i) {
        const double a = static_cast<double>(row[i0[i]]);
        const double wi = w[i];
        dst[i - lo] = wi == 0.0 ? a : a + (static_cast<double>(row[i1[i]]) - a) * wi;
    };
    std::int64_t i = lo;
    for (; i < pair_lo; ++i) scalar(i);
#if defined(__SSE2__)
    // Where i0 + 1 is inside the row, both taps come from one load.
    for (; i + 2 <= pair_hi; i += 2) {
        const __m128d p0 = load_pair<Tin>(row + i0[i]);
        const __m128d p1 = load_pair<Tin>(row + i0[i + 1]);
        const __m128d r = lerp2(_mm_unpacklo_pd(p0, p1), _mm_unpackhi_pd(p0, p1), _mm_loadu_pd(w + i));
        _mm_storeu_pd(dst + (i - lo), r);
    }
#endif
    for (; i < hi; ++i) scalar(i);
}

inline void lerp_rows(const double* a, const double* b, double w, std::int64_t n, double* dst) {
    if (w == 0.0) {
        std::memcpy(dst, a, sizeof(double) * static_cast<std::size_t>(n));
        return;
    }
    for (std::int64_t i = 0; i < n; ++i) dst[i] = a[i] + (b[i] - a[i]) * w;
}

// Output row of the z pass, rounded to float32 once; the body uses non-temporal stores (the output is written
// once and not read back here, so it should not evict the ring buffers). Call store_fence() when done.
#ifndef DIFFSEG_STORE_PS
#define DIFFSEG_STORE_PS _mm_stream_ps
#endif
inline void lerp_rows_to_float(const double* a, const double* b, double w, std::int64_t n, float* dst) {
    std::int64_t i = 0;
#if defined(__SSE2__)
    while (i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 15) != 0) {
        dst[i] = static_cast<float>(w == 0.0 ? a[i] : a[i] + (b[i] - a[i]) * w);
        ++i;
    }
    if (w == 0.0) {
        for (; i + 4 <= n; i += 4) {
            const __m128 lo = _mm_cvtpd_ps(_mm_loadu_pd(a + i));
            const __m128 hi = _mm_cvtpd_ps(_mm_loadu_pd(a + i + 2));
            DIFFSEG_STORE_PS(dst + i, _mm_movelh_ps(lo, hi));
        }
    } else {
        const __m128d wv = _mm_set1_pd(w);
        for (; i + 4 <= n; i += 4) {
            const __m128d a0 = _mm_loadu_pd(a + i), a1 = _mm_loadu_pd(a + i + 2);
            const __m128d r0 = _mm_add_pd(a0, _mm_mul_pd(_mm_sub_pd(_mm_loadu_pd(b + i), a0), wv));
            const __m128d r1 = _mm_add_pd(a1, _mm_mul_pd(_mm_sub_pd(_mm_loadu_pd(b + i + 2), a1), wv));
            DIFFSEG_STORE_PS(dst + i, _mm_movelh_ps(_mm_cvtpd_ps(r0), _mm_cvtpd_ps(r1)));
        }
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<float>(w == 0.0 ? a[i] : a[i] + (b[i] - a[i]) * w);
}

inline void store_fence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

template <class Tin>
void linear_separable(const Tin* src, Shape in, float* out, Shape os, const IndexMap& map, float fill,
                      int threads) {
    check_shapes(in, os);
    const SeparableTables tables = make_tables(map, in, os);
    const AxisTable& tx = tables.x;
    const AxisTable& ty = tables.y;
    const AxisTable& tz = tables.z;
    const std::int64_t nxv = tx.hi - tx.lo;
    // Rows per block: ring (2 slices) + x rows of a block in ~512 KiB of doubles.
    std::int64_t block = nxv > 0 ? std::max<std::int64_t>(4, (512 * 1024 / 8) / (4 * nxv)) : os.ny;
    block = std::min<std::int64_t>(block, 64);
    const std::int64_t n_blocks = os.ny > 0 ? (os.ny + block - 1) / block : 0;
    auto ws = workspace_pool().acquire();
    const int nt = resolve_threads(threads, n_blocks);
    if (static_cast<int>(ws->ring.size()) < nt) {
        ws->ring.resize(nt);
        ws->xrows.resize(nt);
    }
    // Input rows one block of output rows reads: about |dc_y/dj| per output row.
    const double scale_y =
        os.ny > 1 ? std::fabs(static_cast<double>(ty.i0[os.ny - 1] - ty.i0[0])) / static_cast<double>(os.ny - 1) : 1.0;
    const std::int64_t max_xrows = std::min<std::int64_t>(
        in.ny, static_cast<std::int64_t>(std::ceil(scale_y * static_cast<double>(block))) + 3);
    // Each thread's buffers are sized here: an exception must not leave the region (see RegionErrors).
    for (int t = 0; t < nt; ++t) {
        ws->ring[t].resize(static_cast<std::size_t>(2 * block * std::max<std::int64_t>(nxv, 1)));
        ws->xrows[t].resize(static_cast<std::size_t>(max_xrows * std::max<std::int64_t>(nxv, 1)));
    }
    RegionErrors errors;  // a block reading more input rows than estimated grows its x rows inside

#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
        const int t = thread_index();
        ScratchArray<double>& ring = ws->ring[t];
        ScratchArray<double>& xr = ws->xrows[t];
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1) nowait
#endif
        for (std::int64_t blk = 0; blk < n_blocks; ++blk) {
            const std::int64_t jb = blk * block, je = std::min(os.ny, jb + block);
            // Inside rows of this block, and the input rows they read.
            const std::int64_t vb = std::max(jb, ty.lo), ve = std::min(je, ty.hi);
            std::int64_t ymin = 0, ymax = -1;
            if (vb < ve) {
                ymin = in.ny;
                ymax = -1;
                for (std::int64_t j = vb; j < ve; ++j) {
                    ymin = std::min<std::int64_t>(ymin, std::min(ty.i0[j], ty.i1[j]));
                    ymax = std::max<std::int64_t>(ymax, std::max(ty.i0[j], ty.i1[j]));
                }
            }
            const std::int64_t n_xrows = ymax - ymin + 1;
            if (n_xrows > max_xrows &&
                !errors.run([&] { xr.resize(static_cast<std::size_t>(n_xrows * std::max<std::int64_t>(nxv, 1))); }))
                continue;  // out of memory: rethrown after the region
            std::int64_t tag[2] = {-1, -1};
            auto slice = [&](std::int64_t s) -> const double* {
                for (int q = 0; q < 2; ++q)
                    if (tag[q] == s) return ring.data() + q * block * nxv;
                return nullptr;
            };
            // Fills a ring slot (not holding `keep`) with input slice s resampled in x and y for this block.
            auto make_slice = [&](std::int64_t s, std::int64_t keep) -> const double* {
                int q;
                if (keep >= 0)
                    q = tag[0] == keep ? 1 : 0;
                else  // evict the slot farther from s (slices are visited monotonically)
                    q = (tag[0] < 0 || (tag[1] >= 0 && std::llabs(tag[0] - s) > std::llabs(tag[1] - s))) ? 0 : 1;
                double* dst = ring.data() + q * block * nxv;
                for (std::int64_t y = ymin; y <= ymax; ++y)
                    lerp_row_x<Tin>(src + (s * in.ny + y) * in.nx, tx, xr.data() + (y - ymin) * nxv);
                for (std::int64_t j = vb; j < ve; ++j)
                    lerp_rows(xr.data() + (ty.i0[j] - ymin) * nxv, xr.data() + (ty.i1[j] - ymin) * nxv, ty.w[j],
                              nxv, dst + (j - jb) * nxv);
                tag[q] = s;
                return dst;
            };
            for (std::int64_t k = 0; k < os.nz; ++k) {
                float* base = out + (k * os.ny) * os.nx;
                const bool kin = k >= tz.lo && k < tz.hi;
                if (!kin || vb >= ve || nxv <= 0) {
                    fill_n(base + jb * os.nx, (je - jb) * os.nx, fill);
                    continue;
                }
                const std::int64_t s0 = tz.i0[k], s1 = tz.i1[k];
                const double wz = tz.w[k];
                const double* t0 = slice(s0);
                if (!t0) t0 = make_slice(s0, wz != 0.0 ? s1 : -1);
                const double* t1 = t0;
                if (wz != 0.0) {
                    t1 = slice(s1);
                    if (!t1) t1 = make_slice(s1, s0);
                    t0 = slice(s0);  // make_slice never evicts s0, but re-read the pointer for clarity
                }
                fill_n(base + jb * os.nx, (vb - jb) * os.nx, fill);
                fill_n(base + ve * os.nx, (je - ve) * os.nx, fill);
                if (nxv == os.nx) {  // whole rows inside: the block's rows are one contiguous span
                    lerp_rows_to_float(t0 + (vb - jb) * nxv, t1 + (vb - jb) * nxv, wz, (ve - vb) * nxv,
                                       base + vb * os.nx);
                    continue;
                }
                for (std::int64_t j = vb; j < ve; ++j) {
                    float* row = base + j * os.nx;
                    fill_n(row, tx.lo, fill);
                    lerp_rows_to_float(t0 + (j - jb) * nxv, t1 + (j - jb) * nxv, wz, nxv, row + tx.lo);
                    fill_n(row + tx.hi, os.nx - tx.hi, fill);
                }
            }
        }
        store_fence();  // order this thread's non-temporal stores before the region's closing barrier
    }
    errors.rethrow();
}

// ------------------------------------------------------------------------------------- general (any affine)

// Calls f(r, start, vec) for every output row r = k * ny + j: voxel i of the row maps to the continuous input
// index start + (i / nx) * vec (ITK's scanline formula).
template <class F>
void for_each_output_row(Shape os, const IndexMap& map, int threads, F&& f) {
    const std::int64_t rows = os.nz * os.ny;
    const int nt = resolve_threads(threads, rows);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(dynamic, 64)
#endif
    for (std::int64_t r = 0; r < rows; ++r) {
        double start[3], vec[3];
        map.row(r % os.ny, r / os.ny, os.nx, start, vec);
        f(r, start, vec);
    }
}

// Continuous index of voxel i of a row.
#define DIFFSEG_ROW_INDEX                                                   \
    const double alpha = static_cast<double>(i) / static_cast<double>(os.nx); \
    const double cx = start[0] + alpha * vec[0];                            \
    const double cy = start[1] + alpha * vec[1];                            \
    const double cz = start[2] + alpha * vec[2];

template <class Tin>
inline double linear_at(const Tin* src, Shape in, double cx, double cy, double cz) {
    const LinearTap tx = linear_tap(cx, in.nx), ty = linear_tap(cy, in.ny), tz = linear_tap(cz, in.nz);
    auto along_x = [&](std::int64_t z, std::int64_t y) {
        const Tin* row = src + (z * in.ny + y) * in.nx;
        const double a = static_cast<double>(row[tx.i0]);
        return tx.w == 0.0 ? a : a + (static_cast<double>(row[tx.i1]) - a) * tx.w;
    };
    double v0 = along_x(tz.i0, ty.i0);
    if (ty.w != 0.0) v0 = v0 + (along_x(tz.i0, ty.i1) - v0) * ty.w;
    if (tz.w != 0.0) {
        double v1 = along_x(tz.i1, ty.i0);
        if (ty.w != 0.0) v1 = v1 + (along_x(tz.i1, ty.i1) - v1) * ty.w;
        v0 = v0 + (v1 - v0) * tz.w;
    }
    return v0;
}

template <class Tin>
void linear_general(const Tin* src, Shape in, float* out, Shape os, const IndexMap& map, float fill, int threads) {
    check_shapes(in, os);
    for_each_output_row(os, map, threads, [&](std::int64_t r, const double* start, const double* vec) {
        float* row = out + r * os.nx;
        for (std::int64_t i = 0; i < os.nx; ++i) {
            DIFFSEG_ROW_INDEX
            if (inside_axis(cx, in.nx) && inside_axis(cy, in.ny) && inside_axis(cz, in.nz))
                row[i] = static_cast<float>(linear_at(src, in, cx, cy, cz));
            else
                row[i] = fill;
        }
    });
}

template <class Tin>
void linear(const Tin* src, Shape in, float* out, Shape os, const IndexMap& map, float fill, int threads) {
    if (os.voxels() == 0) return;
    if (in.voxels() == 0) {
        fill_n(out, os.voxels(), fill);
        return;
    }
    if (map.separable)
        linear_separable<Tin>(src, in, out, os, map, fill, threads);
    else
        linear_general<Tin>(src, in, out, os, map, fill, threads);
}

// ------------------------------------------------------------------------------------- nearest

// Byte gathers of 16 outputs from one 16-byte source window (pshufb): for a nearest x table whose 16 consecutive
// entries span at most 16 source voxels (any upsampling, and downsampling by up to 16/15), a row costs one load,
// one shuffle and one store per 16 voxels instead of 16 indexed loads and stores.
struct ShuffleRow {
    std::vector<std::int32_t> base;    // per 16-output chunk: first source voxel of the window, or -1 (scalar)
    std::vector<std::uint8_t> control;  // 16 shuffle indices per chunk
};

inline ShuffleRow make_shuffle_row(const std::int32_t* xi, std::int64_t x_lo, std::int64_t x_hi, std::int64_t nx_in) {
    ShuffleRow t;
    const std::int64_t chunks = (x_hi - x_lo) / 16;
    t.base.assign(static_cast<std::size_t>(chunks), -1);
    t.control.assign(static_cast<std::size_t>(chunks) * 16, 0);
    if (nx_in < 16) return t;
    for (std::int64_t c = 0; c < chunks; ++c) {
        const std::int32_t* v = xi + x_lo + 16 * c;
        const std::int64_t lo = *std::min_element(v, v + 16), hi = *std::max_element(v, v + 16);
        // The window must stay inside the source row: it may start before lo.
        const std::int64_t b = std::min(lo, nx_in - 16);
        if (hi - b > 15) continue;
        t.base[c] = static_cast<std::int32_t>(b);
        for (int k = 0; k < 16; ++k) t.control[16 * c + k] = static_cast<std::uint8_t>(v[k] - b);
    }
    return t;
}

#if DIFFSEG_HAVE_SSSE3_DISPATCH
__attribute__((target("ssse3"))) inline void gather_row_ssse3(const std::uint8_t* src, std::uint8_t* dst,
                                                              const std::int32_t* base, const std::uint8_t* control,
                                                              std::int64_t chunks, const std::int32_t* xi) {
    for (std::int64_t c = 0; c < chunks; ++c) {
        const std::int32_t b = base[c];
        if (b >= 0) {
            const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + b));
            const __m128i k = _mm_loadu_si128(reinterpret_cast<const __m128i*>(control + 16 * c));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * c), _mm_shuffle_epi8(w, k));
        } else {
            for (int q = 0; q < 16; ++q) dst[16 * c + q] = src[xi[16 * c + q]];
        }
    }
}

inline bool have_ssse3() {
    static const bool ok = __builtin_cpu_supports("ssse3");
    return ok;
}
#endif

// Calls f(r0, r1) on blocks of output rows [r0, r1) whose bytes (row_bytes each, from `out`) are whole 2 MiB
// pages, taken dynamically by the threads: a fresh output is faulted in as transparent huge pages, and two threads
// that touch the same huge page would wait for each other while the kernel zeroes it.
template <class F>
void for_each_page_block(std::int64_t rows, const void* out, std::size_t row_bytes, int threads, F&& f) {
    constexpr std::uintptr_t kPage = std::uintptr_t(1) << 21;
    const std::uintptr_t rb = std::max<std::size_t>(row_bytes, 1);
    const std::int64_t per = std::max<std::int64_t>(1, static_cast<std::int64_t>(kPage / rb));
    const std::uintptr_t addr = reinterpret_cast<std::uintptr_t>(out);
    const std::int64_t head =
        std::min<std::int64_t>(rows, static_cast<std::int64_t>((kPage - addr % kPage) % kPage / rb));
    const std::int64_t first = head > 0 ? 1 : 0;  // rows before the first page boundary
    const std::int64_t blocks = first + (rows - head + per - 1) / per;
    const int nt = resolve_threads(threads, blocks);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
#endif
    for (std::int64_t b = 0; b < blocks; ++b) {
        const std::int64_t r0 = b < first ? 0 : head + (b - first) * per;
        const std::int64_t r1 = b < first ? head : std::min(rows, r0 + per);
        f(r0, r1);
    }
}

template <class T>
void nearest(const T* src, Shape in, T* out, Shape os, const IndexMap& map, T fill, int threads) {
    check_shapes(in, os);
    if (os.voxels() == 0) return;
    if (in.voxels() == 0) {
        fill_n(out, os.voxels(), fill);
        return;
    }
    if (map.separable) {
        const SeparableTables tables = make_tables(map, in, os);
        const AxisTable& tx = tables.x;
        const AxisTable& ty = tables.y;
        const AxisTable& tz = tables.z;
        // A unit-step x table is a plain copy.
        bool contiguous = tx.hi > tx.lo;
        for (std::int64_t i = tx.lo + 1; i < tx.hi && contiguous; ++i)
            contiguous = tx.nearest[i] == tx.nearest[i - 1] + 1;
        const std::int32_t* const xi = tx.nearest.data();
        const std::int64_t x_lo = tx.lo, x_hi = tx.hi;
        bool shuffle = false;
        ShuffleRow sh;
#if DIFFSEG_HAVE_SSSE3_DISPATCH
        if (sizeof(T) == 1 && !contiguous && x_hi - x_lo >= 16 && have_ssse3()) {
            sh = make_shuffle_row(xi, x_lo, x_hi, in.nx);
            shuffle = true;
        }
#endif
        const std::int64_t chunks = shuffle ? (x_hi - x_lo) / 16 : 0;
        const std::int64_t rows = os.nz * os.ny;
        for_each_page_block(rows, out, sizeof(T) * static_cast<std::size_t>(os.nx), threads,
                            [&](std::int64_t r0, std::int64_t r1) {
            for (std::int64_t r = r0; r < r1; ++r) {
                const std::int64_t k = r / os.ny, j = r % os.ny;
                T* row = out + r * os.nx;
                if (k < tz.lo || k >= tz.hi || j < ty.lo || j >= ty.hi) {
                    fill_n(row, os.nx, fill);
                    continue;
                }
                const T* s = src + (static_cast<std::int64_t>(tz.nearest[k]) * in.ny + ty.nearest[j]) * in.nx;
                fill_n(row, x_lo, fill);
                std::int64_t i = x_lo;
                if (contiguous) {
                    std::memcpy(row + x_lo, s + xi[x_lo], sizeof(T) * static_cast<std::size_t>(x_hi - x_lo));
                    i = x_hi;
                }
#if DIFFSEG_HAVE_SSSE3_DISPATCH
                if (shuffle) {
                    gather_row_ssse3(reinterpret_cast<const std::uint8_t*>(s),
                                     reinterpret_cast<std::uint8_t*>(row + x_lo), sh.base.data(), sh.control.data(),
                                     chunks, xi + x_lo);
                    i = x_lo + 16 * chunks;
                }
#endif
                // Bounds and tables are locals: byte stores may alias anything, which would force reloads.
                for (; i + 4 <= x_hi; i += 4) {
                    const T v0 = s[xi[i]], v1 = s[xi[i + 1]], v2 = s[xi[i + 2]], v3 = s[xi[i + 3]];
                    row[i] = v0;
                    row[i + 1] = v1;
                    row[i + 2] = v2;
                    row[i + 3] = v3;
                }
                for (; i < x_hi; ++i) row[i] = s[xi[i]];
                fill_n(row + x_hi, os.nx - x_hi, fill);
            }
        });
        return;
    }
    for_each_output_row(os, map, threads, [&](std::int64_t r, const double* start, const double* vec) {
        T* row = out + r * os.nx;
        for (std::int64_t i = 0; i < os.nx; ++i) {
            DIFFSEG_ROW_INDEX
            if (inside_axis(cx, in.nx) && inside_axis(cy, in.ny) && inside_axis(cz, in.nz)) {
                const std::int64_t x = std::min(nearest_index(cx), in.nx - 1);
                const std::int64_t y = std::min(nearest_index(cy), in.ny - 1);
                const std::int64_t z = std::min(nearest_index(cz), in.nz - 1);
                row[i] = src[(z * in.ny + y) * in.nx + x];
            } else {
                row[i] = fill;
            }
        }
    });
}

// ------------------------------------------------------------------------------------- label vote

template <class T>
void label_vote(const T* src, Shape in, T* out, Shape os, const IndexMap& map, T fill, int threads) {
    check_shapes(in, os);
    if (os.voxels() == 0) return;
    if (in.voxels() == 0) {
        fill_n(out, os.voxels(), fill);
        return;
    }
    for_each_output_row(os, map, threads, [&](std::int64_t r, const double* start, const double* vec) {
        T* row = out + r * os.nx;
        for (std::int64_t i = 0; i < os.nx; ++i) {
            DIFFSEG_ROW_INDEX
            if (!(inside_axis(cx, in.nx) && inside_axis(cy, in.ny) && inside_axis(cz, in.nz))) {
                row[i] = fill;
                continue;
            }
            const LinearTap t[3] = {linear_tap(cx, in.nx), linear_tap(cy, in.ny), linear_tap(cz, in.nz)};
            T labels[8];
            double weight[8];
            int n = 0;
            const int nzt = t[2].w == 0.0 ? 1 : 2, nyt = t[1].w == 0.0 ? 1 : 2, nxt = t[0].w == 0.0 ? 1 : 2;
            for (int a = 0; a < nzt; ++a) {
                const std::int64_t z = a ? t[2].i1 : t[2].i0;
                const double wz = nzt == 1 ? 1.0 : (a ? t[2].w : 1.0 - t[2].w);
                for (int b = 0; b < nyt; ++b) {
                    const std::int64_t y = b ? t[1].i1 : t[1].i0;
                    const double wy = nyt == 1 ? 1.0 : (b ? t[1].w : 1.0 - t[1].w);
                    const T* srow = src + (z * in.ny + y) * in.nx;
                    for (int c = 0; c < nxt; ++c) {
                        const std::int64_t x = c ? t[0].i1 : t[0].i0;
                        const double wx = nxt == 1 ? 1.0 : (c ? t[0].w : 1.0 - t[0].w);
                        const T v = srow[x];
                        const double wv = wz * wy * wx;
                        int q = 0;
                        while (q < n && labels[q] != v) ++q;
                        if (q == n) {
                            labels[n] = v;
                            weight[n++] = wv;
                        } else {
                            weight[q] += wv;
                        }
                    }
                }
            }
            int best = 0;
            for (int q = 1; q < n; ++q)
                if (weight[q] > weight[best] || (weight[q] == weight[best] && labels[q] < labels[best])) best = q;
            row[i] = labels[best];
        }
    });
}

#undef DIFFSEG_ROW_INDEX

}  // namespace rs
}  // namespace diffseg
