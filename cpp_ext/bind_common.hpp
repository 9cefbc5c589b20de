// Small helpers shared by the binding files: argument checks that raise ValueError/TypeError with the argument's
// name and what was received.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace diffseg {
namespace bind {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        if (i) s += ", ";
        s += std::to_string(a.shape(i));
    }
    if (a.ndim() == 1) s += ",";
    return s + ")";
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// A 3D C-contiguous array, or ValueError naming `what`.
inline void require_volume(const py::array& a, const char* what) {
    if (a.ndim() != 3)
        throw std::invalid_argument(std::string(what) + " must be a 3D array [z, y, x], got shape " + shape_str(a));
    if (!(a.flags() & py::array::c_style))
        throw std::invalid_argument(std::string(what) + " must be C-contiguous (use numpy.ascontiguousarray)");
}

inline void require_writeable(const py::array& a, const char* what) {
    if (!a.writeable()) throw std::invalid_argument(std::string(what) + " must be writeable");
}

inline void require_same_shape(const py::array& a, const py::array& b, const char* what_a, const char* what_b) {
    bool same = a.ndim() == b.ndim();
    for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == b.shape(i);
    if (!same)
        throw std::invalid_argument(std::string(what_a) + " has shape " + shape_str(a) + " but " + what_b +
                                    " has shape " + shape_str(b) + "; they must match");
}

// 'f4', 'i2', 'u1', ... as numpy spells the kind and item size.
inline std::string kind_size(const py::array& a) {
    return std::string(1, a.dtype().kind()) + std::to_string(a.itemsize());
}

}  // namespace bind
}  // namespace diffseg
