// Python bindings of the resampling kernels (diffseg/resample.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bind_common.hpp"
#include "diffseg/resample.hpp"

namespace py = pybind11;

namespace {

using diffseg::bind::dtype_str;
using diffseg::bind::kind_size;
using diffseg::rs::IndexMap;
using diffseg::rs::Shape;

Shape shape_of(const py::array& a) { return Shape{a.shape(0), a.shape(1), a.shape(2)}; }

using Matrix = py::array_t<double, py::array::c_style | py::array::forcecast>;

void copy_matrix(const Matrix& m, const char* name, double out[3][3]) {
    if (m.ndim() != 2 || m.shape(0) != 3 || m.shape(1) != 3)
        throw std::invalid_argument(std::string(name) + " must have shape (3, 3), got " + diffseg::bind::shape_str(m));
    auto v = m.unchecked<2>();
    for (int r = 0; r < 3; ++r)
        for (int c = 0; c < 3; ++c) out[r][c] = v(r, c);
}

void copy_vector(const Matrix& m, const char* name, double out[3]) {
    if (m.ndim() != 1 || m.shape(0) != 3)
        throw std::invalid_argument(std::string(name) + " must have shape (3,), got " + diffseg::bind::shape_str(m));
    auto v = m.unchecked<1>();
    for (int r = 0; r < 3; ++r) out[r] = v(r);
}

// The index map from the grids' matrices (see diffseg/resample.hpp).
IndexMap index_map(const py::tuple& geometry) {
    if (geometry.size() != 5)
        throw std::invalid_argument("geometry must be (index_to_physical_out, origin_out, physical_to_index_in, "
                                    "origin_in, separable)");
    IndexMap map;
    copy_matrix(geometry[0].cast<Matrix>(), "index_to_physical_out", map.i2p);
    copy_vector(geometry[1].cast<Matrix>(), "origin_out", map.o_out);
    copy_matrix(geometry[2].cast<Matrix>(), "physical_to_index_in", map.p2i);
    copy_vector(geometry[3].cast<Matrix>(), "origin_in", map.o_in);
    map.separable = geometry[4].cast<bool>();
    return map;
}

void check_io(const py::array& src, const py::array& out) {
    diffseg::bind::require_volume(src, "source");
    diffseg::bind::require_volume(out, "out");
    diffseg::bind::require_writeable(out, "out");
}

template <class T>
const T* cptr(const py::array& a) {
    return static_cast<const T*>(a.data());
}
template <class T>
T* mptr(py::array& a) {
    return static_cast<T*>(a.mutable_data());
}

void resample_linear(const py::array& src, py::array out, const py::tuple& geometry, double fill, int threads) {
    check_io(src, out);
    if (kind_size(out) != "f4") throw std::invalid_argument("out must be float32, got " + dtype_str(out));
    const IndexMap A = index_map(geometry);
    const Shape in = shape_of(src), os = shape_of(out);
    const std::string k = kind_size(src);
    float* o = mptr<float>(out);
    const float f = static_cast<float>(fill);
    py::gil_scoped_release nogil;
    if (k == "f4")
        diffseg::rs::linear<float>(cptr<float>(src), in, o, os, A, f, threads);
    else if (k == "f8")
        diffseg::rs::linear<double>(cptr<double>(src), in, o, os, A, f, threads);
    else if (k == "i2")
        diffseg::rs::linear<std::int16_t>(cptr<std::int16_t>(src), in, o, os, A, f, threads);
    else if (k == "u2")
        diffseg::rs::linear<std::uint16_t>(cptr<std::uint16_t>(src), in, o, os, A, f, threads);
    else if (k == "u1")
        diffseg::rs::linear<std::uint8_t>(cptr<std::uint8_t>(src), in, o, os, A, f, threads);
    else
        throw py::type_error("linear resampling takes float32, float64, int16, uint16 or uint8 sources, got " + k);
}

template <class T>
void nearest_typed(const py::array& src, py::array& out, const IndexMap& A, const py::array& fill, int threads) {
    const T f = *static_cast<const T*>(fill.data());
    const T* s = cptr<T>(src);
    T* o = mptr<T>(out);
    const Shape in = shape_of(src), os = shape_of(out);
    py::gil_scoped_release nogil;
    diffseg::rs::nearest<T>(s, in, o, os, A, f, threads);
}

template <class T>
void vote_typed(const py::array& src, py::array& out, const IndexMap& A, const py::array& fill, int threads) {
    const T f = *static_cast<const T*>(fill.data());
    const T* s = cptr<T>(src);
    T* o = mptr<T>(out);
    const Shape in = shape_of(src), os = shape_of(out);
    py::gil_scoped_release nogil;
    diffseg::rs::label_vote<T>(s, in, o, os, A, f, threads);
}

void check_same_dtype(const py::array& src, const py::array& out, const py::array& fill) {
    if (!src.dtype().is(out.dtype()) && kind_size(src) != kind_size(out))
        throw std::invalid_argument("out must have the source dtype " + dtype_str(src) + ", got " + dtype_str(out));
    if (fill.size() != 1 || kind_size(fill) != kind_size(src))
        throw std::invalid_argument("fill must be one value of the source dtype " + dtype_str(src));
}

void resample_nearest(const py::array& src, py::array out, const py::tuple& geometry, const py::array& fill,
                      int threads) {
    check_io(src, out);
    check_same_dtype(src, out, fill);
    const IndexMap A = index_map(geometry);
    switch (src.itemsize()) {  // nearest only moves values: the item size is all that matters
        case 1: return nearest_typed<std::uint8_t>(src, out, A, fill, threads);
        case 2: return nearest_typed<std::uint16_t>(src, out, A, fill, threads);
        case 4: return nearest_typed<std::uint32_t>(src, out, A, fill, threads);
        case 8: return nearest_typed<std::uint64_t>(src, out, A, fill, threads);
        default: throw py::type_error("nearest resampling takes 1, 2, 4 or 8-byte items, got " + dtype_str(src));
    }
}

void resample_label_vote(const py::array& src, py::array out, const py::tuple& geometry, const py::array& fill,
                         int threads) {
    check_io(src, out);
    check_same_dtype(src, out, fill);
    const IndexMap A = index_map(geometry);
    const std::string k = kind_size(src);
    if (k == "u1" || k == "b1") return vote_typed<std::uint8_t>(src, out, A, fill, threads);
    if (k == "i1") return vote_typed<std::int8_t>(src, out, A, fill, threads);
    if (k == "u2") return vote_typed<std::uint16_t>(src, out, A, fill, threads);
    if (k == "i2") return vote_typed<std::int16_t>(src, out, A, fill, threads);
    if (k == "u4") return vote_typed<std::uint32_t>(src, out, A, fill, threads);
    if (k == "i4") return vote_typed<std::int32_t>(src, out, A, fill, threads);
    if (k == "u8") return vote_typed<std::uint64_t>(src, out, A, fill, threads);
    if (k == "i8") return vote_typed<std::int64_t>(src, out, A, fill, threads);
    throw py::type_error("label vote takes integer label maps, got " + dtype_str(src));
}

}  // namespace

void register_resample(py::module_& m) {
    const char* geometry_doc =
        "`geometry` is (index_to_physical_out, origin_out, physical_to_index_in, origin_in, separable): the\n"
        "output grid's D*diag(S) and origin, the input grid's (D*diag(S))^-1 and origin (x, y, z order), and\n"
        "whether their composition is diagonal (the separable path). Continuous indices are computed as\n"
        "itk::ResampleImageFilter does.";
    m.def("resample_linear", &resample_linear, py::arg("source"), py::arg("out"), py::arg("geometry"),
          py::arg("fill") = 0.0, py::arg("threads") = 0,
          (std::string("Trilinear resampling (SimpleITK rules) of a [z, y, x] source into `out` (float32); points\n"
                       "outside the source get `fill`. ") + geometry_doc).c_str());
    m.def("resample_nearest", &resample_nearest, py::arg("source"), py::arg("out"), py::arg("geometry"),
          py::arg("fill"), py::arg("threads") = 0,
          (std::string("Nearest-neighbour resampling (index = floor(c + 0.5)) into `out` of the source's dtype;\n"
                       "`fill` is a one-element array of that dtype. ") + geometry_doc).c_str());
    m.def("resample_label_vote", &resample_label_vote, py::arg("source"), py::arg("out"), py::arg("geometry"),
          py::arg("fill"), py::arg("threads") = 0,
          (std::string("Label-map resampling by trilinear vote: each of the 8 taps votes for its label with its\n"
                       "weight; the heaviest label wins, ties go to the smallest label. ") + geometry_doc).c_str());
}
