// Per-component statistics, size filtering and largest-K selection on the runs of diffseg/components.hpp.
//
// Everything here costs O(runs), not O(voxels): a component's voxel count, bounding box and index centroid are
// sums over its runs (the x sum of a run is an arithmetic series), and an intensity image is read only where
// runs lie. Nothing here knows about Python.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "diffseg/components.hpp"

namespace diffseg {
namespace cc {

// ---------------------------------------------------------------------------------------------- statistics

// Per-component statistics, written into caller-owned arrays of n entries (index 0 = component 1).
struct StatsOut {
    std::int64_t* count = nullptr;   // [n]
    std::int64_t* bbox = nullptr;    // [n, 6]: z0, y0, x0, z1, y1, x1 (stop exclusive)
    double* centroid = nullptr;      // [n, 3]: mean z, y, x index
    double* sum = nullptr;           // [n] intensity sum (only with an intensity image)
    double* max = nullptr;           // [n] intensity max (NaN if any voxel is NaN)
};

// Per-run intensity sum and max over image[z, y, x0:x1].
template <class V>
void run_intensity(Workspace& ws, const V* image, int threads) {
    ws.run_sum.resize(static_cast<std::size_t>(ws.n_runs));
    ws.run_max.resize(static_cast<std::size_t>(ws.n_runs));
    double* rs = ws.run_sum.data();
    double* rm = ws.run_max.data();
    const Run* runs = ws.runs.data();
    const std::int64_t* row_start = ws.row_start.data();
    const std::int64_t nx = ws.shape.nx, rows = ws.shape.rows();
    // Runs of a sparse mask sit in rows far apart, so each run's image data is a cache miss; fetch the runs of
    // the row `ahead` rows on while summing this one.
    const std::int64_t ahead = 2;
    for_each_row(ws, threads, [&](std::int64_t r, std::int64_t b, std::int64_t e) {
        if (r + ahead < rows) {
            const V* next = image + (r + ahead) * nx;
            for (std::int64_t i = row_start[r + ahead]; i < row_start[r + ahead + 1]; ++i) {
#if defined(__GNUC__)
                __builtin_prefetch(next + runs[i].x0);
                __builtin_prefetch(next + runs[i].x1 - 1);
#endif
            }
        }
        const V* row = image + r * nx;
        for (std::int64_t i = b; i < e; ++i) {
            double sum = 0.0, max = -std::numeric_limits<double>::infinity();
            bool nan = false;
            for (std::int32_t x = runs[i].x0; x < runs[i].x1; ++x) {
                const double v = static_cast<double>(row[x]);
                sum += v;
                max = v > max ? v : max;
                nan |= (v != v);
            }
            rs[i] = sum;
            rm[i] = nan ? std::numeric_limits<double>::quiet_NaN() : max;
        }
    });
}

// Reduces runs to components. `component_of(i)` gives the 1-based component of run i. With intensity, call
// run_intensity first. Throws std::invalid_argument if a component number exceeds n.
template <class ComponentOf>
void reduce_stats(const Workspace& ws, std::int64_t n, bool with_intensity, const StatsOut& out,
                  ComponentOf&& component_of) {
    const std::int64_t big = std::numeric_limits<std::int64_t>::max();
    for (std::int64_t c = 0; c < n; ++c) {
        out.count[c] = 0;
        for (int k = 0; k < 3; ++k) {
            out.bbox[6 * c + k] = big;
            out.bbox[6 * c + 3 + k] = 0;
            out.centroid[3 * c + k] = 0.0;
        }
        if (with_intensity) {
            out.sum[c] = 0.0;
            out.max[c] = -std::numeric_limits<double>::infinity();
        }
    }
    const Shape& s = ws.shape;
    const Run* runs = ws.runs.data();
    for (std::int64_t r = 0; r < s.rows(); ++r) {
        const std::int64_t z = r / s.ny, y = r % s.ny;
        for (std::int64_t i = ws.row_start[r]; i < ws.row_start[r + 1]; ++i) {
            const std::uint64_t comp = component_of(i);
            if (comp == 0) continue;
            if (comp > static_cast<std::uint64_t>(n))
                throw std::invalid_argument("labels hold the value " + std::to_string(comp) +
                                            ", greater than n = " + std::to_string(n));
            const std::int64_t c = static_cast<std::int64_t>(comp) - 1;
            const std::int64_t x0 = runs[i].x0, x1 = runs[i].x1, len = x1 - x0;
            out.count[c] += len;
            std::int64_t* bb = out.bbox + 6 * c;
            bb[0] = std::min(bb[0], z);
            bb[1] = std::min(bb[1], y);
            bb[2] = std::min(bb[2], x0);
            bb[3] = std::max(bb[3], z + 1);
            bb[4] = std::max(bb[4], y + 1);
            bb[5] = std::max(bb[5], x1);
            double* ce = out.centroid + 3 * c;
            ce[0] += static_cast<double>(z * len);
            ce[1] += static_cast<double>(y * len);
            ce[2] += static_cast<double>((x0 + x1 - 1) * len / 2);  // sum of x0..x1-1, an exact integer
            if (with_intensity) {
                out.sum[c] += ws.run_sum[i];
                const double m = ws.run_max[i];
                double& cm = out.max[c];
                if (m != m || cm != cm)
                    cm = std::numeric_limits<double>::quiet_NaN();
                else if (m > cm)
                    cm = m;
            }
        }
    }
    for (std::int64_t c = 0; c < n; ++c) {
        const double k = out.count[c] ? static_cast<double>(out.count[c]) : 1.0;
        for (int a = 0; a < 3; ++a) out.centroid[3 * c + a] /= k;
        if (out.count[c] == 0) {
            for (int a = 0; a < 6; ++a) out.bbox[6 * c + a] = 0;
            for (int a = 0; a < 3; ++a) out.centroid[3 * c + a] = std::numeric_limits<double>::quiet_NaN();
            if (with_intensity) out.max[c] = std::numeric_limits<double>::quiet_NaN();
        }
    }
}

// Component sizes from runs (after label_runs), counts[c - 1] for component c.
inline void component_sizes(const Workspace& ws, std::int64_t* counts) {
    std::fill(counts, counts + ws.n_components, std::int64_t(0));
    for (std::int64_t i = 0; i < ws.n_runs; ++i)
        counts[ws.label[i] - 1] += ws.runs[i].x1 - ws.runs[i].x0;
}

// keep[c] (c = 1..n; keep[0] = 0) for components of at least `min_voxels` voxels, of which only the
// `keep_largest` largest if keep_largest >= 0 (ties: the lower component number wins). Returns the count kept.
inline std::int64_t select_components(const std::int64_t* counts, std::int64_t n, std::int64_t min_voxels,
                                      std::int64_t keep_largest, std::uint8_t* keep) {
    keep[0] = 0;
    std::vector<std::int64_t> order;
    for (std::int64_t c = 1; c <= n; ++c) {
        keep[c] = counts[c - 1] >= min_voxels ? 1 : 0;
        if (keep[c]) order.push_back(c);
    }
    if (keep_largest >= 0 && static_cast<std::int64_t>(order.size()) > keep_largest) {
        std::stable_sort(order.begin(), order.end(),
                         [&](std::int64_t a, std::int64_t b) { return counts[a - 1] > counts[b - 1]; });
        for (std::size_t k = static_cast<std::size_t>(keep_largest); k < order.size(); ++k) keep[order[k]] = 0;
        order.resize(static_cast<std::size_t>(keep_largest));
    }
    return static_cast<std::int64_t>(order.size());
}

}  // namespace cc
}  // namespace diffseg
