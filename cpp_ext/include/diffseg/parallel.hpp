// Thread-count helpers over OpenMP (a serial build runs everything on the calling thread).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

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

// The first exception thrown by work inside an OpenMP region, carried out of it. An exception must not leave a
// region (the runtime then calls std::terminate, and the process dies instead of Python getting MemoryError), so
// work that may throw (an allocation) runs through run() and the caller calls rethrow() after the region. Once
// anything has failed, later run() calls skip their work. Wrap whole chunks of work, never an inner loop.
class RegionErrors {
  public:
    // Runs f() unless something failed already; whether f() ran and returned.
    template <class F>
    bool run(F&& f) noexcept {
        if (failed()) return false;
        try {
            f();
            return true;
        } catch (...) {
            std::exception_ptr e = std::current_exception();
#ifdef _OPENMP
#pragma omp critical(diffseg_region_errors)
#endif
            if (!error_) error_ = e;
            failed_.store(true, std::memory_order_relaxed);
            return false;
        }
    }

    bool failed() const { return failed_.load(std::memory_order_relaxed); }

    // After the region: throws the recorded exception, if any.
    void rethrow() const {
        if (error_) std::rethrow_exception(error_);
    }

  private:
    std::exception_ptr error_;
    std::atomic<bool> failed_{false};
};

}  // namespace diffseg
