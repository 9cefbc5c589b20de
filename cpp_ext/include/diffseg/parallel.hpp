// Thread-count helpers over OpenMP (a serial build runs everything on the calling thread).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace diffseg {

// The thread count to use: `requested` if positive, else OpenMP's default (OMP_NUM_THREADS or the cores),
// never more than `work_items` and never less than 1.
inline int resolve_threads(int requested, std::int64_t work_items) {
#ifdef _OPENMP
    int t = requested > 0 ? requested : omp_get_max_threads();
#else
    (void)requested;
    int t = 1;
#endif
    if (work_items < t) t = static_cast<int>(std::max<std::int64_t>(work_items, 1));
    return std::max(t, 1);
}

inline int thread_index() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Contiguous share [begin, end) of n items for part `part` of `parts`.
inline void split_range(std::int64_t n, int parts, int part, std::int64_t& begin, std::int64_t& end) {
    const std::int64_t base = n / parts, extra = n % parts;
    begin = part * base + std::min<std::int64_t>(part, extra);
    end = begin + base + (part < extra ? 1 : 0);
}

}  // namespace diffseg
