// Connected components of 3D binary and multi-label volumes, and per-component statistics, on x-runs.
//
// Algorithm (run-based two-pass labelling):
//   1. Each x-row of the C-ordered [z, y, x] volume is encoded as runs [x0, x1) of equal non-zero value (binary
//      mode: of any non-zero value). Rows are scanned 64 voxels at a time with SSE2 compare + movemask into
//      64-bit masks; runs are read off the mask transitions with count-trailing-zeros, and all-zero chunks cost
//      one compare. Threads take contiguous z slabs.
//   2. Each run is united (union-find over run indices, union by minimum index, path halving) with the runs it
//      touches in the rows of its previous half-neighbourhood: (z, y-1) and (z-1, y) for 6-connectivity; plus
//      (z-1, y±1) for 18; with runs widened by one voxel along x where the offset allows a diagonal step
//      (18: in-plane and straight-down rows; 26: all four rows). Unions stay inside a thread's slab; the slab
//      seams are joined afterwards on one thread.
//   3. Because every tree's root is its smallest run index, and runs are stored in raster order, numbering roots
//      in run order numbers components by the raster position of their first voxel -- the convention of
//      scipy.ndimage.label and cc3d.
//   4. Outputs are painted run by run (background pages of a zeroed output are never touched), and statistics,
//      size filtering and largest-K selection work on runs: O(runs), not O(voxels).
//
// Nothing here knows about Python; errors are std::invalid_argument with a message for the caller.
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

#include "diffseg/memory.hpp"
#include "diffseg/parallel.hpp"

namespace diffseg {
namespace cc {

struct Run {
    std::int32_t x0;  // first voxel
    std::int32_t x1;  // one past the last voxel
};

struct Shape {
    std::int64_t nz = 0, ny = 0, nx = 0;
    std::int64_t rows() const { return nz * ny; }
    std::int64_t voxels() const { return nz * ny * nx; }
};

// Scratch kept between calls (see memory.hpp); one per concurrent caller.
struct Workspace {
    std::vector<ScratchArray<Run>> thread_runs;
    std::vector<ScratchArray<std::uint64_t>> thread_values;
    ScratchArray<std::int64_t> row_start;  // rows + 1 entries: runs of row r are [row_start[r], row_start[r+1])
    ScratchArray<Run> runs;
    ScratchArray<std::uint64_t> values;  // the voxel value of each run (multi-label mode and stats)
    ScratchArray<std::int32_t> parent;
    ScratchArray<std::uint32_t> label;  // final component number (1..n) of each run
    ScratchArray<double> run_sum, run_max;
    std::vector<std::int64_t> slab_offset;
    Shape shape;
    bool multilabel = false;
    std::int64_t n_runs = 0;
    std::int64_t n_components = 0;
    int threads = 1;
};

inline WorkspacePool<Workspace>& workspace_pool() {
    static WorkspacePool<Workspace> pool;
    return pool;
}

// ---------------------------------------------------------------------------------------------- row scanning

// Masks of a full 64-element chunk: bit k of `nonzero` is p[k] != 0; bit k of `change` is p[k] != p[k-1]
// (p[-1] is `before`). `change` is only computed when `want_change`.
template <class T>
inline void chunk_masks_scalar(const T* p, int len, T before, bool want_change, std::uint64_t& nonzero,
                               std::uint64_t& change) {
    std::uint64_t nz = 0, ch = 0;
    T prev = before;
    for (int k = 0; k < len; ++k) {
        const T v = p[k];
        nz |= std::uint64_t(v != 0) << k;
        ch |= std::uint64_t(v != prev) << k;
        prev = v;
    }
    nonzero = nz;
    change = want_change ? ch : 0;
}

#if defined(__SSE2__)
// 16 lanes of `eq` as a 16-bit movemask, for 8/16/32-bit element types (loading 16 elements from p and q).
template <class T>
inline unsigned eq16(const T* p, const T* q);

template <>
inline unsigned eq16<std::uint8_t>(const std::uint8_t* p, const std::uint8_t* q) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    return unsigned(_mm_movemask_epi8(_mm_cmpeq_epi8(a, b)));
}

template <>
inline unsigned eq16<std::uint16_t>(const std::uint16_t* p, const std::uint16_t* q) {
    const __m128i* pa = reinterpret_cast<const __m128i*>(p);
    const __m128i* pb = reinterpret_cast<const __m128i*>(q);
    const __m128i e0 = _mm_cmpeq_epi16(_mm_loadu_si128(pa), _mm_loadu_si128(pb));
    const __m128i e1 = _mm_cmpeq_epi16(_mm_loadu_si128(pa + 1), _mm_loadu_si128(pb + 1));
    return unsigned(_mm_movemask_epi8(_mm_packs_epi16(e0, e1)));
}

template <>
inline unsigned eq16<std::uint32_t>(const std::uint32_t* p, const std::uint32_t* q) {
    const __m128i* pa = reinterpret_cast<const __m128i*>(p);
    const __m128i* pb = reinterpret_cast<const __m128i*>(q);
    const __m128i e0 = _mm_cmpeq_epi32(_mm_loadu_si128(pa), _mm_loadu_si128(pb));
    const __m128i e1 = _mm_cmpeq_epi32(_mm_loadu_si128(pa + 1), _mm_loadu_si128(pb + 1));
    const __m128i e2 = _mm_cmpeq_epi32(_mm_loadu_si128(pa + 2), _mm_loadu_si128(pb + 2));
    const __m128i e3 = _mm_cmpeq_epi32(_mm_loadu_si128(pa + 3), _mm_loadu_si128(pb + 3));
    return unsigned(_mm_movemask_epi8(_mm_packs_epi16(_mm_packs_epi32(e0, e1), _mm_packs_epi32(e2, e3))));
}

template <class T>
inline unsigned zero16(const T* p) {
    alignas(16) static const T zeros[16] = {};
    return eq16<T>(p, zeros);
}

template <class T>
struct HasSimdMasks : std::integral_constant<bool, sizeof(T) <= 4> {};
#else
template <class T>
struct HasSimdMasks : std::false_type {};
#endif

template <class T>
inline void chunk_masks(const T* p, int len, T before, bool first_in_row, bool want_change,
                        std::uint64_t& nonzero, std::uint64_t& change) {
#if defined(__SSE2__)
    if constexpr (HasSimdMasks<T>::value) {
        if (len == 64) {
            std::uint64_t z = 0;
            for (int k = 0; k < 4; ++k) z |= std::uint64_t(zero16<T>(p + 16 * k)) << (16 * k);
            nonzero = ~z;
            if (!want_change || (nonzero == 0 && before == 0)) {
                change = 0;
                return;
            }
            std::uint64_t e = 0;
            for (int k = 1; k < 4; ++k) e |= std::uint64_t(eq16<T>(p + 16 * k, p + 16 * k - 1)) << (16 * k);
            if (first_in_row) {
                // p[-1] is not in the row: lanes 1..16 from p[1..16] == p[0..15], lane 0 from `before`.
                e |= std::uint64_t(eq16<T>(p + 1, p)) << 1;
                e |= std::uint64_t(p[0] == before);
            } else {
                e |= std::uint64_t(eq16<T>(p, p - 1));
            }
            change = ~e;
            return;
        }
    }
#endif
    (void)first_in_row;
    chunk_masks_scalar<T>(p, len, before, want_change, nonzero, change);
}

// Calls emit(x0, x1, value) for every run of a row, in x order.
template <class T, class Emit>
inline void scan_row(const T* row, std::int64_t nx, bool multilabel, Emit&& emit) {
    bool in_run = false;
    std::int64_t start = 0;
    std::uint64_t current = 0;
    T before = 0;
    for (std::int64_t x = 0; x < nx; x += 64) {
        const int len = static_cast<int>(std::min<std::int64_t>(64, nx - x));
        const T* p = row + x;
        std::uint64_t nonzero, change;
        chunk_masks<T>(p, len, before, x == 0, multilabel, nonzero, change);
        const std::uint64_t valid = len == 64 ? ~std::uint64_t(0) : ((std::uint64_t(1) << len) - 1);
        std::uint64_t boundary;
        if (multilabel) {
            boundary = change & valid;
        } else {
            boundary = (nonzero ^ ((nonzero << 1) | std::uint64_t(in_run ? 1 : 0))) & valid;
        }
        before = p[len - 1];
        while (boundary) {
#if defined(__GNUC__)
            const int b = __builtin_ctzll(boundary);
#else
            int b = 0;
            while (!((boundary >> b) & 1)) ++b;
#endif
            boundary &= boundary - 1;
            const std::int64_t pos = x + b;
            if (in_run) emit(start, pos, current);
            const T v = p[b];
            if (v != 0) {
                in_run = true;
                start = pos;
                current = multilabel ? static_cast<std::uint64_t>(v) : 1;
            } else {
                in_run = false;
            }
        }
    }
    if (in_run) emit(start, nx, current);
}

// ---------------------------------------------------------------------------------------------- union-find

inline std::int32_t find_root(std::int32_t* parent, std::int32_t x) {
    while (parent[x] != x) {
        parent[x] = parent[parent[x]];
        x = parent[x];
    }
    return x;
}

inline void unite(std::int32_t* parent, std::int32_t a, std::int32_t b) {
    a = find_root(parent, a);
    b = find_root(parent, b);
    if (a == b) return;
    if (a < b)
        parent[b] = a;
    else
        parent[a] = b;
}

struct NeighbourRow {
    int dz, dy, widen;
};

// Rows of the previous half-neighbourhood that can hold neighbours of a run, per connectivity.
inline int neighbour_rows(int connectivity, NeighbourRow out[4]) {
    switch (connectivity) {
        case 6:
            out[0] = {0, -1, 0};
            out[1] = {-1, 0, 0};
            return 2;
        case 18:
            out[0] = {0, -1, 1};
            out[1] = {-1, -1, 0};
            out[2] = {-1, 0, 1};
            out[3] = {-1, 1, 0};
            return 4;
        case 26:
            out[0] = {0, -1, 1};
            out[1] = {-1, -1, 1};
            out[2] = {-1, 0, 1};
            out[3] = {-1, 1, 1};
            return 4;
        default:
            throw std::invalid_argument("connectivity must be 6, 18 or 26, got " + std::to_string(connectivity));
    }
}

// Unites each run of row (z, y) with the runs it touches in the neighbour rows `nb` (rows before z_min are
// skipped: they belong to another thread's slab).
inline void unite_row_with_neighbours(Workspace& ws, std::int64_t z, std::int64_t y, const NeighbourRow* nb,
                                      int n_nb, std::int64_t z_min) {
    const Shape& s = ws.shape;
    const std::int64_t r = z * s.ny + y;
    const std::int64_t rb = ws.row_start[r], re = ws.row_start[r + 1];
    if (rb == re) return;
    std::int64_t j0[4], qe[4];
    int widen[4];
    int rows = 0;
    for (int k = 0; k < n_nb; ++k) {
        const std::int64_t qz = z + nb[k].dz, qy = y + nb[k].dy;
        if (qz < z_min || qy < 0 || qy >= s.ny) continue;
        const std::int64_t q = qz * s.ny + qy;
        if (ws.row_start[q] == ws.row_start[q + 1]) continue;
        j0[rows] = ws.row_start[q];
        qe[rows] = ws.row_start[q + 1];
        widen[rows] = nb[k].widen;
        ++rows;
    }
    if (!rows) return;
    const Run* runs = ws.runs.data();
    const std::uint64_t* values = ws.values.data();
    std::int32_t* parent = ws.parent.data();
    const bool multilabel = ws.multilabel;
    for (std::int64_t i = rb; i < re; ++i) {
        const Run a = runs[i];
        // Within a slab, i is still a root here (runs only ever link to earlier runs); at a seam it may not be.
        std::int32_t ri = find_root(parent, static_cast<std::int32_t>(i));
        for (int k = 0; k < rows; ++k) {
            const int w = widen[k];
            std::int64_t j = j0[k];
            const std::int64_t je = qe[k];
            while (j < je && runs[j].x1 + w <= a.x0) ++j;
            j0[k] = j;
            for (; j < je && runs[j].x0 - w < a.x1; ++j) {
                if (multilabel && values[i] != values[j]) continue;
                if (parent[j] == ri) continue;  // already in i's tree (common in dense masks)
                const std::int32_t rj = find_root(parent, static_cast<std::int32_t>(j));
                if (rj == ri) continue;
                if (rj < ri) {
                    parent[ri] = rj;
                    ri = rj;
                } else {
                    parent[rj] = ri;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------- labelling

// Step 1 for one thread: the runs of slab [z0, z1) into the thread's buffers, with row_start[r] relative to the
// slab. Values are stored only if `keep_values`; their range is returned in vmin/vmax.
template <class T>
void extract_slab(Workspace& ws, const T* data, const Shape& shape, int t, std::int64_t z0, std::int64_t z1,
                  bool multilabel, bool keep_values, std::uint64_t& vmin, std::uint64_t& vmax) {
    ScratchArray<Run>& truns = ws.thread_runs[t];
    ScratchArray<std::uint64_t>& tvals = ws.thread_values[t];
    truns.clear();
    tvals.clear();
    // A row holds at most nx/2 + 1 runs of one value, nx of several; reserving that much per row lets the
    // emitter write without capacity checks.
    const std::size_t row_cap = static_cast<std::size_t>(multilabel ? shape.nx : shape.nx / 2 + 1);
    std::uint64_t lo = std::numeric_limits<std::uint64_t>::max(), hi = 0;
    for (std::int64_t z = z0; z < z1; ++z) {
        for (std::int64_t y = 0; y < shape.ny; ++y) {
            const std::int64_t r = z * shape.ny + y;
            const std::size_t base = truns.size();
            ws.row_start[r] = static_cast<std::int64_t>(base);
            truns.reserve(base + row_cap);
            if (keep_values) tvals.reserve(base + row_cap);
            Run* const out = truns.data() + base;
            std::uint64_t* const vout = keep_values ? tvals.data() + base : nullptr;
            std::size_t n = 0;
            scan_row<T>(data + r * shape.nx, shape.nx, multilabel,
                        [&](std::int64_t x0, std::int64_t x1, std::uint64_t v) {
                            out[n] = Run{static_cast<std::int32_t>(x0), static_cast<std::int32_t>(x1)};
                            if (vout) {
                                vout[n] = v;
                                lo = v < lo ? v : lo;
                                hi = v > hi ? v : hi;
                            }
                            ++n;
                        });
            truns.resize(base + n);
            if (keep_values) tvals.resize(base + n);
        }
    }
    vmin = lo;
    vmax = hi;
}

// Steps 1-3 (see the top of this file), or only step 1 when `unite` is false. Fills ws.runs, ws.values (if
// keep_values), ws.row_start and, when uniting, ws.parent, ws.label and ws.n_components.
template <class T>
void build_runs(Workspace& ws, const T* data, Shape shape, int connectivity, bool multilabel, bool keep_values,
                bool unite, int threads) {
    NeighbourRow nb[4];
    const int n_nb = unite ? neighbour_rows(connectivity, nb) : 0;
    ws.shape = shape;
    ws.multilabel = multilabel;
    ws.n_runs = 0;
    ws.n_components = 0;
    const std::int64_t rows = shape.rows();
    ws.row_start.resize(static_cast<std::size_t>(rows + 1));
    if (shape.voxels() == 0) {
        for (std::int64_t r = 0; r <= rows; ++r) ws.row_start[r] = 0;
        return;
    }
    if (shape.nx > std::numeric_limits<std::int32_t>::max() - 2)
        throw std::invalid_argument("the x axis is too long for this kernel (more than 2^31 voxels)");
    const int nt = resolve_threads(threads, shape.nz);
    if (static_cast<int>(ws.thread_runs.size()) < nt) {
        ws.thread_runs.resize(nt);
        ws.thread_values.resize(nt);
    }
    ws.slab_offset.assign(static_cast<std::size_t>(nt) + 1, 0);
    std::vector<std::uint64_t> vmin(nt, std::numeric_limits<std::uint64_t>::max()), vmax(nt, 0);
    bool too_many_runs = false;
    int used_threads = nt;

#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
#ifdef _OPENMP
        const int team = omp_get_num_threads();
#else
        const int team = 1;
#endif
        const int t = thread_index();
        std::int64_t z0, z1;
        split_range(shape.nz, team, t, z0, z1);
        extract_slab<T>(ws, data, shape, t, z0, z1, multilabel, keep_values, vmin[t], vmax[t]);
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
        {
            used_threads = team;
            for (int k = 0; k < team; ++k)
                ws.slab_offset[k + 1] = ws.slab_offset[k] + static_cast<std::int64_t>(ws.thread_runs[k].size());
            ws.n_runs = ws.slab_offset[team];
            if (ws.n_runs >= std::numeric_limits<std::int32_t>::max()) {
                too_many_runs = true;
            } else {
                ws.runs.resize(static_cast<std::size_t>(ws.n_runs));
                if (keep_values) ws.values.resize(static_cast<std::size_t>(ws.n_runs));
                if (unite) {
                    ws.parent.resize(static_cast<std::size_t>(ws.n_runs));
                    ws.label.resize(static_cast<std::size_t>(ws.n_runs));
                }
                ws.row_start[rows] = ws.n_runs;
                // A multi-label pass over a mask with a single value needs no value checks.
                if (multilabel) {
                    std::uint64_t lo = std::numeric_limits<std::uint64_t>::max(), hi = 0;
                    for (int k = 0; k < team; ++k) {
                        lo = std::min(lo, vmin[k]);
                        hi = std::max(hi, vmax[k]);
                    }
                    if (lo >= hi) ws.multilabel = false;
                }
            }
        }
        if (!too_many_runs) {
            // Step 2: gather into the global arrays, then unite within the slab.
            const std::int64_t off = ws.slab_offset[t];
            const std::size_t count = ws.thread_runs[t].size();
            if (count) {
                std::memcpy(ws.runs.data() + off, ws.thread_runs[t].data(), count * sizeof(Run));
                if (keep_values)
                    std::memcpy(ws.values.data() + off, ws.thread_values[t].data(), count * sizeof(std::uint64_t));
            }
            for (std::int64_t r = z0 * shape.ny; r < z1 * shape.ny; ++r) ws.row_start[r] += off;
            if (unite) {
                for (std::int64_t i = 0; i < static_cast<std::int64_t>(count); ++i)
                    ws.parent[off + i] = static_cast<std::int32_t>(off + i);
#ifdef _OPENMP
#pragma omp barrier
#endif
                for (std::int64_t z = z0; z < z1; ++z)
                    for (std::int64_t y = 0; y < shape.ny; ++y) unite_row_with_neighbours(ws, z, y, nb, n_nb, z0);
            }
        }
    }
    if (too_many_runs) throw std::invalid_argument("the volume has more than 2^31 runs; split it into parts");
    ws.threads = used_threads;
    if (!unite) return;

    // Seams between slabs: the first plane of each slab against the plane before it.
    NeighbourRow down[4];
    int n_down = 0;
    for (int k = 0; k < n_nb; ++k)
        if (nb[k].dz == -1) down[n_down++] = nb[k];
    for (int t = 1; t < used_threads; ++t) {
        std::int64_t z0, z1;
        split_range(shape.nz, used_threads, t, z0, z1);
        if (z0 >= z1 || z0 == 0) continue;
        for (std::int64_t y = 0; y < shape.ny; ++y) unite_row_with_neighbours(ws, z0, y, down, n_down, 0);
    }

    // Step 3: number the roots in run order; parent[i] <= i, so the parent's number is already known.
    const std::int32_t* parent = ws.parent.data();
    std::uint32_t* label = ws.label.data();
    std::int64_t n = 0;
    for (std::int64_t i = 0; i < ws.n_runs; ++i) {
        const std::int32_t p = parent[i];
        label[i] = p == i ? static_cast<std::uint32_t>(++n) : label[p];
    }
    ws.n_components = n;
}

// Labels the components of a mask (steps 1-3).
template <class T>
void label_runs(Workspace& ws, const T* data, Shape shape, int connectivity, bool multilabel, int threads) {
    build_runs<T>(ws, data, shape, connectivity, multilabel, multilabel, true, threads);
}

// Runs of a label image (each run holds one value), without uniting: for statistics of given labels.
template <class T>
void collect_runs(Workspace& ws, const T* data, Shape shape, int threads) {
    build_runs<T>(ws, data, shape, 26, true, true, false, threads);
}

// Rows that hold at least one run (a measure of how many output pages painting will touch).
inline std::int64_t rows_with_runs(const Workspace& ws) {
    std::int64_t n = 0;
    for (std::int64_t r = 0; r < ws.shape.rows(); ++r) n += ws.row_start[r + 1] != ws.row_start[r];
    return n;
}

// ---------------------------------------------------------------------------------------------- painting

// Calls f(row_index, row_begin_run, row_end_run) for every row, rows split across threads by z slabs.
template <class F>
void for_each_row(const Workspace& ws, int threads, F&& f) {
    const Shape& s = ws.shape;
    const std::int64_t rows = s.rows();
    const int nt = resolve_threads(threads, s.nz);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (std::int64_t r = 0; r < rows; ++r) f(r, ws.row_start[r], ws.row_start[r + 1]);
}

// out[z, y, x] = number of the run's component (0 in the background). `zero_background`: also write the
// background (for a caller-provided buffer); otherwise `out` must already be zero.
template <class L>
void paint_labels(const Workspace& ws, L* out, bool zero_background, int threads) {
    const std::int64_t nx = ws.shape.nx;
    const Run* runs = ws.runs.data();
    const std::uint32_t* label = ws.label.data();
    for_each_row(ws, threads, [&](std::int64_t r, std::int64_t b, std::int64_t e) {
        L* row = out + r * nx;
        std::int64_t x = 0;
        for (std::int64_t i = b; i < e; ++i) {
            const Run run = runs[i];
            if (zero_background)
                for (std::int64_t k = x; k < run.x0; ++k) row[k] = L(0);
            const L v = static_cast<L>(label[i]);
            if (run.x1 - run.x0 >= 32) {
                std::fill(row + run.x0, row + run.x1, v);
            } else {  // short runs (dense masks): a plain loop beats the call
                for (std::int32_t k = run.x0; k < run.x1; ++k) row[k] = v;
            }
            x = run.x1;
        }
        if (zero_background && x < nx) std::fill(row + x, row + nx, L(0));
    });
}

// out = in where the run's component is kept, 0 elsewhere.
template <class T>
void paint_kept(const Workspace& ws, const T* in, T* out, const std::uint8_t* keep, bool zero_background,
                int threads) {
    const std::int64_t nx = ws.shape.nx;
    const Run* runs = ws.runs.data();
    const std::uint32_t* label = ws.label.data();
    for_each_row(ws, threads, [&](std::int64_t r, std::int64_t b, std::int64_t e) {
        T* row = out + r * nx;
        const T* src = in + r * nx;
        std::int64_t x = 0;
        for (std::int64_t i = b; i < e; ++i) {
            const Run run = runs[i];
            if (keep[label[i]]) {
                if (zero_background && run.x0 > x) std::fill(row + x, row + run.x0, T(0));
                if (row != src)  // in place: the kept voxels are already there
                    std::memcpy(row + run.x0, src + run.x0, sizeof(T) * static_cast<std::size_t>(run.x1 - run.x0));
                x = run.x1;
            }
        }
        if (zero_background && x < nx) std::fill(row + x, row + nx, T(0));
    });
}

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
