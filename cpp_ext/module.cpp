// Python bindings entry point. Each kernel family registers itself from its own binding file.
#include <pybind11/pybind11.h>

#include <string>
#include <thread>

#include "diffseg/components.hpp"
#include "diffseg/resample.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

// Defined in the binding file of each kernel family.
void register_resample(py::module_& m);
void register_components(py::module_& m);
void register_diffusion(py::module_& m);

namespace {

py::dict build_info() {
    py::dict info;
    info["compiler"] = std::string(DIFFSEG_COMPILER);
    info["cxx_flags"] = std::string(DIFFSEG_CXX_FLAGS);
    info["cxx_standard"] = static_cast<long>(__cplusplus);
    info["openmp"] = static_cast<bool>(DIFFSEG_HAVE_OPENMP);
#ifdef _OPENMP
    info["openmp_max_threads"] = omp_get_max_threads();
#else
    info["openmp_max_threads"] = 1;
#endif
    info["hardware_threads"] = static_cast<long>(std::thread::hardware_concurrency());
#if defined(__AVX512F__)
    info["simd"] = std::string("avx512");
#elif defined(__AVX2__)
    info["simd"] = std::string("avx2");
#else
    info["simd"] = std::string("baseline");
#endif
    return info;
}

void release_scratch() {
    diffseg::cc::workspace_pool().release_all();
    diffseg::rs::workspace_pool().release_all();
}

}  // namespace

PYBIND11_MODULE(_ext, m) {
    m.doc() = "diffseg C++ kernels: physical-space resampling, connected components, lesion statistics, the diffusion step";
    m.def("build_info", &build_info, "Compiler, flags and threading of this build.");
    m.def("release_scratch", &release_scratch, "Free the scratch memory the kernels keep between calls.");
    register_resample(m);
    register_components(m);
    register_diffusion(m);
}
