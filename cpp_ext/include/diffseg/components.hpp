// Connected components of 3D binary and multi-label volumes on x-runs (statistics: component_stats.hpp).
//
// Algorithm (run-based two-pass labelling):
//   1. Each x-row of the C-ordered [z, y, x] volume is encoded as runs [x0, x1) of equal non-zero value (binary
//      mode: of any non-zero value). Rows are scanned 64 voxels at a time with SSE2 compare + movemask into
//      64-bit masks; runs are read off the mask transitions with count-trailing-zeros, and all-zero chunks cost
//      one compare. Threads take chunks of z planes.
//   2. Each run is united (union-find over run indices, union by minimum index, path halving) with the runs it
//      touches in the rows of its previous half-neighbourhood: (z, y-1) and (z-1, y) for 6-connectivity; plus
//      (z-1, y±1) for 18; with runs widened by one voxel along x where the offset allows a diagonal step
//      (18: in-plane and straight-down rows; 26: all four rows). The runs a run touches in a neighbour row
//      come from two lookups in per-row position tables (RowTables), not a search. Unions stay inside a chunk;
//      the chunk seams are joined afterwards on one thread.
//   3. Because every tree's root is its smallest run index, and runs are stored in raster order, numbering roots
//      in run order numbers components by the raster position of their first voxel -- the convention of
//      scipy.ndimage.label and cc3d.
//   4. Outputs are painted run by run (background pages of a zeroed output are never touched), and statistics,
//      size filtering and largest-K selection work on runs: O(runs), not O(voxels).
// Peers for comparison: cc3d (voxel decision tree, SAUF), ITK's ConnectedComponentImageFilter (runs, threads),
// scipy.ndimage.label (line buffers); this code shares none of theirs.
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
    std::vector<ScratchArray<Run>> thread_runs;  // per z chunk (a few per thread)
    std::vector<ScratchArray<std::uint64_t>> thread_values;
    ScratchArray<std::int64_t> row_start;  // rows + 1 entries: runs of row r are [row_start[r], row_start[r+1])
    ScratchArray<Run> runs;
    ScratchArray<std::uint64_t> values;  // the voxel value of each run (multi-label mode and stats)
    ScratchArray<std::int32_t> parent;
    ScratchArray<std::uint32_t> label;  // final component number (1..n) of each run
    ScratchArray<double> run_sum, run_max;
    std::vector<ScratchArray<std::uint16_t>> row_tables;  // per thread: see RowTables
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

// Joins run j's tree to the tree whose root is ri (the run being scanned); the smaller index stays the root, so
// that labels come out in raster order. Returns the joined tree's root.
inline std::int32_t join_run(std::int32_t* parent, std::int32_t ri, std::int64_t j) {
    if (parent[j] == ri) return ri;  // already in ri's tree (common in dense masks)
    const std::int32_t rj = find_root(parent, static_cast<std::int32_t>(j));
    if (rj == ri) return ri;
    if (rj < ri) {
        parent[ri] = rj;
        return rj;
    }
    parent[rj] = ri;
    return ri;
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

// The neighbour rows as compile-time constants (the widening then folds into the comparisons).
template <int Conn>
struct Neighbours;
template <>
struct Neighbours<6> {
    static constexpr int n = 2;
    static constexpr NeighbourRow row[4] = {{0, -1, 0}, {-1, 0, 0}, {0, 0, 0}, {0, 0, 0}};
};
template <>
struct Neighbours<18> {
    static constexpr int n = 4;
    static constexpr NeighbourRow row[4] = {{0, -1, 1}, {-1, -1, 0}, {-1, 0, 1}, {-1, 1, 0}};
};
template <>
struct Neighbours<26> {
    static constexpr int n = 4;
    static constexpr NeighbourRow row[4] = {{0, -1, 1}, {-1, -1, 1}, {-1, 0, 1}, {-1, 1, 1}};
};

// Unites each run of row (z, y) with the runs it touches in the neighbour rows of connectivity Conn. Rows before
// z_min belong to another thread's slab and are skipped; `seam` visits only the rows of plane z - 1 (the seam
// pass joins slabs after the threads are done).
template <int Conn, bool Multi>
inline void unite_row(Workspace& ws, std::int64_t z, std::int64_t y, std::int64_t z_min, bool seam) {
    using N = Neighbours<Conn>;
    const Shape& s = ws.shape;
    const std::int64_t* row_start = ws.row_start.data();
    const std::int64_t r = z * s.ny + y;
    const std::int64_t rb = row_start[r], re = row_start[r + 1];
    if (rb == re) return;
    std::int64_t j0[N::n], qe[N::n];
    bool any = false;
    for (int k = 0; k < N::n; ++k) {
        const std::int64_t qz = z + N::row[k].dz, qy = y + N::row[k].dy;
        j0[k] = qe[k] = 0;  // empty
        if (qz < z_min || qy < 0 || qy >= s.ny || (seam && N::row[k].dz == 0)) continue;
        const std::int64_t q = qz * s.ny + qy;
        j0[k] = row_start[q];
        qe[k] = row_start[q + 1];
        any |= j0[k] != qe[k];
    }
    if (!any) return;
    const Run* runs = ws.runs.data();
    const std::uint64_t* values = ws.values.data();
    std::int32_t* parent = ws.parent.data();
    for (std::int64_t i = rb; i < re; ++i) {
        const Run a = runs[i];
        // Within a slab, i is still a root here (runs only ever link to earlier runs); at a seam it may not be.
        std::int32_t ri = find_root(parent, static_cast<std::int32_t>(i));
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 4
#endif
        for (int k = 0; k < N::n; ++k) {
            const int w = N::row[k].widen;
            std::int64_t j = j0[k];
            const std::int64_t je = qe[k];
            while (j < je && runs[j].x1 + w <= a.x0) ++j;
            j0[k] = j;
            for (; j < je && runs[j].x0 - w < a.x1; ++j) {
                if (Multi && values[i] != values[j]) continue;
                ri = join_run(parent, ri, j);
            }
        }
    }
}

// Per-row position tables, so that the runs a run touches in a neighbour row are found by two lookups instead of
// a search whose data-dependent loop exits mispredict (they dominated the time on dense masks). For a row with
// runs sorted by x and position p in [-1, nx + 1], at index p + 1:
//   ends[p + 1]   = number of runs with x1 <= p  (the runs that end before p),
//   starts[p + 1] = number of runs with x0 < p   (the runs that start before p).
// The runs within one voxel of [x0, x1) are then [ends[x0 - 1 + 1], starts[x1 + 1 + 1]) (widen 1), or
// [ends[x0 + 1], starts[x1 + 1]) (widen 0). Counts fit uint16 for rows up to 65535 voxels.
// A thread keeps the tables of two planes (z and z - 1), ny rows each.
struct RowTables {
    std::int64_t stride = 0;  // entries per table: nx + 3, plus room for the overshooting fills, multiple of 8
    std::int64_t ny = 0;
    std::uint16_t* base = nullptr;
    std::uint16_t* ends(std::int64_t z, std::int64_t y) const { return base + (((z & 1) * ny + y) * 2) * stride; }
    std::uint16_t* starts(std::int64_t z, std::int64_t y) const { return ends(z, y) + stride; }
};

constexpr std::int64_t kMaxTableRow = 65535;

// t[q] = k for q in [q_from, q_to), with 16-entry stores that may run past q_to (the caller fills in increasing
// order, so the next fill or the tail overwrites the excess; the table has 16 entries of slack).
inline void fill_count(std::uint16_t* t, std::int64_t q_from, std::int64_t q_to, std::uint16_t k) {
#if defined(__SSE2__)
    const __m128i v = _mm_set1_epi16(static_cast<short>(k));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(t + q_from), v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(t + q_from + 8), v);
    for (std::int64_t q = q_from + 16; q < q_to; q += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(t + q), v);
#else
    for (std::int64_t q = q_from; q < q_to; ++q) t[q] = k;
#endif
}

inline void build_row_tables(const Run* runs, std::int64_t rb, std::int64_t re, std::int64_t nx, std::uint16_t* ends,
                             std::uint16_t* starts) {
    std::int64_t qe = 0, qs = 0;
    std::uint16_t k = 0;
    for (std::int64_t i = rb; i < re; ++i, ++k) {
        // ends steps to k + 1 at index x1 + 1, starts at index x0 + 2.
        const std::int64_t e = runs[i].x1 + 1, b = runs[i].x0 + 2;
        fill_count(ends, qe, e, k);
        fill_count(starts, qs, b, k);
        qe = e;
        qs = b;
    }
    const std::int64_t n = nx + 3;
    for (std::int64_t q = qe; q < n; ++q) ends[q] = k;
    for (std::int64_t q = qs; q < n; ++q) starts[q] = k;
}

// unite_row through the position tables (rows of one slab; not for seams). Builds the tables of row (z, y) for the
// rows after it.
template <int Conn, bool Multi>
inline void unite_row_tables(Workspace& ws, const RowTables& tab, std::int64_t z, std::int64_t y,
                             std::int64_t z_min) {
    using N = Neighbours<Conn>;
    const Shape& s = ws.shape;
    const std::int64_t* row_start = ws.row_start.data();
    const Run* runs = ws.runs.data();
    const std::int64_t r = z * s.ny + y;
    const std::int64_t rb = row_start[r], re = row_start[r + 1];
    build_row_tables(runs, rb, re, s.nx, tab.ends(z, y), tab.starts(z, y));
    if (rb == re) return;
    const std::uint16_t* te[N::n];
    const std::uint16_t* ts[N::n];
    std::int64_t qb[N::n];
    bool valid[N::n];
    bool any = false;
    for (int k = 0; k < N::n; ++k) {
        const std::int64_t qz = z + N::row[k].dz, qy = y + N::row[k].dy;
        valid[k] = qz >= z_min && qy >= 0 && qy < s.ny;
        te[k] = ts[k] = nullptr;
        qb[k] = 0;
        if (!valid[k]) continue;
        const std::int64_t q = qz * s.ny + qy;
        qb[k] = row_start[q];
        valid[k] = row_start[q + 1] != qb[k];
        te[k] = tab.ends(qz, qy) + 1 - N::row[k].widen;  // te[k][x0] = ends[x0 - widen + 1]
        ts[k] = tab.starts(qz, qy) + 1 + N::row[k].widen;  // ts[k][x1] = starts[x1 + widen + 1]
        any |= valid[k];
    }
    if (!any) return;
    const std::uint64_t* values = ws.values.data();
    std::int32_t* parent = ws.parent.data();
    for (std::int64_t i = rb; i < re; ++i) {
        const Run a = runs[i];
        std::int32_t ri = static_cast<std::int32_t>(i);  // within a slab, i is still a root here
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 4
#endif
        for (int k = 0; k < N::n; ++k) {
            if (!valid[k]) continue;
            const std::int64_t je = qb[k] + ts[k][a.x1];
            for (std::int64_t j = qb[k] + te[k][a.x0]; j < je; ++j) {
                if (Multi && values[i] != values[j]) continue;
                ri = join_run(parent, ri, j);
            }
        }
    }
}

// Unites the rows of planes [z0, z1) (or, with `seam`, plane z0 with plane z0 - 1 only). `tables`: scratch for
// the position tables (null: search each row instead, as at the seams).
template <int Conn, bool Multi>
void unite_planes(Workspace& ws, std::int64_t z0, std::int64_t z1, std::int64_t z_min, bool seam,
                  ScratchArray<std::uint16_t>* tables) {
    const Shape& s = ws.shape;
    if (tables && !seam && s.nx <= kMaxTableRow) {
        RowTables tab;
        tab.stride = (s.nx + 3 + 16 + 7) / 8 * 8;
        tab.ny = s.ny;
        tables->resize(static_cast<std::size_t>(2 * s.ny * 2 * tab.stride));
        tab.base = tables->data();
        for (std::int64_t z = z0; z < z1; ++z)
            for (std::int64_t y = 0; y < s.ny; ++y) unite_row_tables<Conn, Multi>(ws, tab, z, y, z_min);
        return;
    }
    for (std::int64_t z = z0; z < z1; ++z)
        for (std::int64_t y = 0; y < s.ny; ++y) unite_row<Conn, Multi>(ws, z, y, z_min, seam);
}

inline void unite_planes(Workspace& ws, int connectivity, std::int64_t z0, std::int64_t z1, std::int64_t z_min,
                         bool seam, ScratchArray<std::uint16_t>* tables = nullptr) {
    const bool multi = ws.multilabel;
    if (connectivity == 6) {
        if (multi) return unite_planes<6, true>(ws, z0, z1, z_min, seam, tables);
        return unite_planes<6, false>(ws, z0, z1, z_min, seam, tables);
    }
    if (connectivity == 18) {
        if (multi) return unite_planes<18, true>(ws, z0, z1, z_min, seam, tables);
        return unite_planes<18, false>(ws, z0, z1, z_min, seam, tables);
    }
    if (multi) return unite_planes<26, true>(ws, z0, z1, z_min, seam, tables);
    return unite_planes<26, false>(ws, z0, z1, z_min, seam, tables);
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
//
// The z axis is cut into a few chunks per thread, taken dynamically: on a shared machine a thread that loses
// its core for a while does not hold up the others at the barriers. Unions stay inside a chunk; the chunk
// seams are joined at the end on one thread.
template <class T>
void build_runs(Workspace& ws, const T* data, Shape shape, int connectivity, bool multilabel, bool keep_values,
                bool unite, int threads) {
    if (unite && connectivity != 6 && connectivity != 18 && connectivity != 26)
        throw std::invalid_argument("connectivity must be 6, 18 or 26, got " + std::to_string(connectivity));
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
    const std::int64_t n_chunks = nt == 1 ? 1 : std::min<std::int64_t>(shape.nz, 4 * nt);
    if (static_cast<std::int64_t>(ws.thread_runs.size()) < n_chunks) {
        ws.thread_runs.resize(static_cast<std::size_t>(n_chunks));
        ws.thread_values.resize(static_cast<std::size_t>(n_chunks));
    }
    if (static_cast<int>(ws.row_tables.size()) < nt) ws.row_tables.resize(static_cast<std::size_t>(nt));
    ws.slab_offset.assign(static_cast<std::size_t>(n_chunks) + 1, 0);
    std::vector<std::uint64_t> vmin(n_chunks, std::numeric_limits<std::uint64_t>::max()), vmax(n_chunks, 0);
    bool too_many_runs = false;
    RegionErrors errors;  // an allocation that fails on a thread, rethrown after the region
    auto chunk_planes = [&](std::int64_t c, std::int64_t& z0, std::int64_t& z1) {
        split_range(shape.nz, static_cast<int>(n_chunks), static_cast<int>(c), z0, z1);
    };

#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
        // Step 1: runs of each chunk, with row starts relative to the chunk.
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (std::int64_t c = 0; c < n_chunks; ++c) {
            std::int64_t z0, z1;
            chunk_planes(c, z0, z1);
            errors.run([&] {
                extract_slab<T>(ws, data, shape, static_cast<int>(c), z0, z1, multilabel, keep_values, vmin[c],
                                vmax[c]);
            });
        }
#ifdef _OPENMP
#pragma omp single
#endif
        {
            for (std::int64_t c = 0; c < n_chunks; ++c)
                ws.slab_offset[c + 1] = ws.slab_offset[c] + static_cast<std::int64_t>(ws.thread_runs[c].size());
            ws.n_runs = ws.slab_offset[n_chunks];
            if (ws.n_runs >= std::numeric_limits<std::int32_t>::max()) {
                too_many_runs = true;
            } else {
                errors.run([&] {
                    ws.runs.resize(static_cast<std::size_t>(ws.n_runs));
                    if (keep_values) ws.values.resize(static_cast<std::size_t>(ws.n_runs));
                    if (unite) {
                        ws.parent.resize(static_cast<std::size_t>(ws.n_runs));
                        ws.label.resize(static_cast<std::size_t>(ws.n_runs));
                    }
                });
                ws.row_start[rows] = ws.n_runs;
                // A multi-label pass over a mask with a single value needs no value checks.
                if (multilabel) {
                    const std::uint64_t lo = *std::min_element(vmin.begin(), vmin.end());
                    const std::uint64_t hi = *std::max_element(vmax.begin(), vmax.end());
                    if (lo >= hi) ws.multilabel = false;
                }
            }
        }
        // Read after the barrier closing `single`, so every thread takes the same branch (all or none of the
        // team must reach each `for`).
        if (!too_many_runs && !errors.failed()) {
            // Step 2: gather into the global arrays, ...
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
            for (std::int64_t c = 0; c < n_chunks; ++c) {
                std::int64_t z0, z1;
                chunk_planes(c, z0, z1);
                const std::int64_t off = ws.slab_offset[c];
                const std::size_t count = ws.thread_runs[c].size();
                if (count) {
                    std::memcpy(ws.runs.data() + off, ws.thread_runs[c].data(), count * sizeof(Run));
                    if (keep_values)
                        std::memcpy(ws.values.data() + off, ws.thread_values[c].data(),
                                    count * sizeof(std::uint64_t));
                }
                for (std::int64_t r = z0 * shape.ny; r < z1 * shape.ny; ++r) ws.row_start[r] += off;
                if (unite)
                    for (std::int64_t i = 0; i < static_cast<std::int64_t>(count); ++i)
                        ws.parent[off + i] = static_cast<std::int32_t>(off + i);
            }
            // ... then unite within each chunk (after the barrier: a chunk's last row ends where the next begins).
            if (unite) {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
                for (std::int64_t c = 0; c < n_chunks; ++c) {
                    std::int64_t z0, z1;
                    chunk_planes(c, z0, z1);
                    errors.run([&] {
                        unite_planes(ws, connectivity, z0, z1, z0, false, &ws.row_tables[thread_index()]);
                    });
                }
            }
        }
    }
    errors.rethrow();
    if (too_many_runs) throw std::invalid_argument("the volume has more than 2^31 runs; split it into parts");
    ws.threads = nt;
    if (!unite) return;

    // Seams between chunks: the first plane of each chunk against the plane before it.
    for (std::int64_t c = 1; c < n_chunks; ++c) {
        std::int64_t z0, z1;
        chunk_planes(c, z0, z1);
        if (z0 < z1) unite_planes(ws, connectivity, z0, z0 + 1, 0, true);
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
#pragma omp parallel for num_threads(nt) schedule(dynamic, 256)
#endif
    for (std::int64_t r = 0; r < rows; ++r) f(r, ws.row_start[r], ws.row_start[r + 1]);
}

#if defined(__SSE2__)
template <class L>
inline __m128i broadcast16(L v) {
    if constexpr (sizeof(L) == 1) return _mm_set1_epi8(static_cast<char>(v));
    if constexpr (sizeof(L) == 2) return _mm_set1_epi16(static_cast<short>(v));
    if constexpr (sizeof(L) == 4) return _mm_set1_epi32(static_cast<int>(v));
    return _mm_set1_epi64x(static_cast<long long>(v));
}
#endif

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
        std::int64_t i = b;
#if defined(__SSE2__)
        if (!zero_background) {
            // Dense rows hold many short runs: paint each with whole 16-byte stores, overshooting past its end,
            // then clear the overshoot with zero stores. Later runs start further right and overwrite what the
            // zero stores covered of them, so every voxel ends with the right value; the stores stay in the row.
            // Two stores of each kind are unconditional: a loop whose trip count follows the run length
            // mispredicts on short runs, and one more store costs less.
            constexpr std::int64_t chunk = 16 / sizeof(L);
            const __m128i zero = _mm_setzero_si128();
            for (; i < e && runs[i].x1 + 2 * chunk <= nx; ++i) {
                const std::int64_t x0 = runs[i].x0, x1 = runs[i].x1;
                const __m128i v = broadcast16<L>(static_cast<L>(label[i]));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(row + x0), v);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(row + x0 + chunk), v);
                for (std::int64_t k = x0 + 2 * chunk; k < x1; k += chunk)
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(row + k), v);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(row + x1), zero);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(row + x1 + chunk), zero);
            }
            if (i > b) x = runs[i - 1].x1 + 2 * chunk;  // past the last zero stores
        }
#endif
        for (; i < e; ++i) {
            const Run run = runs[i];
            if (zero_background)
                for (std::int64_t k = x; k < run.x0; ++k) row[k] = L(0);
            const L v = static_cast<L>(label[i]);
            if (run.x1 - run.x0 >= 32) {
                std::fill(row + run.x0, row + run.x1, v);
            } else {  // short runs: a plain loop beats the call
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

}  // namespace cc
}  // namespace diffseg
