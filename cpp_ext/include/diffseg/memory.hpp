// Scratch memory for the kernels: growable arrays backed by anonymous mmap with MADV_HUGEPAGE, kept alive
// between calls in a small pool.
//
// Why not std::vector: on the micro-VMs we deploy on, a 4 KiB page fault costs about 0.35 s per GiB touched and
// memory that stays free for ~2 s is handed back to the host (then 1.2-2.4 s per GiB to touch again). Scratch
// that lives across calls and is mapped with transparent huge pages avoids both; untouched capacity costs
// nothing (anonymous pages are only materialised when written).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
// Under AddressSanitizer, heap memory (with red zones) lets the sanitizer see out-of-bounds accesses.
#define DIFFSEG_HAVE_MMAP 0
#include <cstdlib>
#elif defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define DIFFSEG_HAVE_MMAP 1
#else
#define DIFFSEG_HAVE_MMAP 0
#include <cstdlib>
#endif

namespace diffseg {

// Raw zeroed page-backed allocation. Large blocks are marked for transparent huge pages (a 2 MiB fault costs
// far less than 512 small ones), unless `huge_pages` is false: then only the 4 KiB pages actually written are
// ever materialised, which is cheaper for an output that will be written sparsely.
inline void* map_bytes(std::size_t bytes, bool huge_pages = true) {
    if (bytes == 0) return nullptr;
#if DIFFSEG_HAVE_MMAP
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
    if (bytes >= (std::size_t(2) << 20)) madvise(p, bytes, huge_pages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
#else
    (void)huge_pages;
#endif
    return p;
#else
    (void)huge_pages;
    void* p = std::calloc(bytes, 1);
    if (!p) throw std::bad_alloc();
    return p;
#endif
}

inline void unmap_bytes(void* p, std::size_t bytes) {
    if (!p) return;
#if DIFFSEG_HAVE_MMAP
    munmap(p, bytes);
#else
    (void)bytes;
    std::free(p);
#endif
}

// A growable array of trivially copyable T on mapped memory. Capacity only grows (geometrically); clear()
// keeps the pages so the next call finds them resident.
template <class T>
class ScratchArray {
    static_assert(std::is_trivially_copyable<T>::value, "ScratchArray holds trivially copyable types");

  public:
    ScratchArray() = default;
    ScratchArray(const ScratchArray&) = delete;
    ScratchArray& operator=(const ScratchArray&) = delete;
    ScratchArray(ScratchArray&& o) noexcept { swap(o); }
    ScratchArray& operator=(ScratchArray&& o) noexcept {
        swap(o);
        return *this;
    }
    ~ScratchArray() { unmap_bytes(data_, bytes_of(cap_)); }

    T* data() { return data_; }
    const T* data() const { return data_; }
    std::size_t size() const { return size_; }
    std::size_t capacity() const { return cap_; }
    T& operator[](std::size_t i) { return data_[i]; }
    const T& operator[](std::size_t i) const { return data_[i]; }

    void clear() { size_ = 0; }

    // Ensures room for n elements without changing size; contents up to size() are kept.
    void reserve(std::size_t n) {
        if (n <= cap_) return;
        std::size_t cap = cap_ ? cap_ : 1024;
        while (cap < n) cap *= 2;
        T* p = static_cast<T*>(map_bytes(bytes_of(cap)));
        if (size_) std::memcpy(p, data_, size_ * sizeof(T));
        unmap_bytes(data_, bytes_of(cap_));
        data_ = p;
        cap_ = cap;
    }

    // Sets the size to n (contents beyond the old size are unspecified).
    void resize(std::size_t n) {
        reserve(n);
        size_ = n;
    }

    void push_back(const T& v) {
        if (size_ == cap_) reserve(size_ + 1);
        data_[size_++] = v;
    }

    void swap(ScratchArray& o) noexcept {
        std::swap(data_, o.data_);
        std::swap(size_, o.size_);
        std::swap(cap_, o.cap_);
    }

  private:
    static std::size_t bytes_of(std::size_t n) {
        // Round to whole pages so that munmap gets the exact mapped length.
        const std::size_t page = 4096;
        return (n * sizeof(T) + page - 1) / page * page;
    }

    T* data_ = nullptr;
    std::size_t size_ = 0;
    std::size_t cap_ = 0;
};

// A pool of reusable workspaces of type W. acquire() hands out a cached one (or a new one); the handle returns
// it on destruction. Concurrent callers get distinct workspaces, so the kernels stay thread-safe.
template <class W>
class WorkspacePool {
  public:
    class Handle {
      public:
        Handle(WorkspacePool* pool, std::unique_ptr<W> w) : pool_(pool), w_(std::move(w)) {}
        Handle(const Handle&) = delete;
        Handle& operator=(const Handle&) = delete;
        ~Handle() { pool_->give_back(std::move(w_)); }
        W& operator*() { return *w_; }
        W* operator->() { return w_.get(); }

      private:
        WorkspacePool* pool_;
        std::unique_ptr<W> w_;
    };

    Handle acquire() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (free_.empty()) return Handle(this, std::make_unique<W>());
        std::unique_ptr<W> w = std::move(free_.back());
        free_.pop_back();
        return Handle(this, std::move(w));
    }

    // Drops all cached workspaces (their memory goes back to the system).
    void release_all() {
        std::lock_guard<std::mutex> lock(mutex_);
        free_.clear();
    }

  private:
    void give_back(std::unique_ptr<W> w) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (free_.size() < kMaxCached) free_.push_back(std::move(w));
    }

    static constexpr std::size_t kMaxCached = 2;
    std::mutex mutex_;
    std::vector<std::unique_ptr<W>> free_;
};

}  // namespace diffseg
