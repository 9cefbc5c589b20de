// Python bindings of connected components and component statistics (diffseg/components.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_common.hpp"
#include "diffseg/component_stats.hpp"
#include "diffseg/components.hpp"

namespace py = pybind11;

namespace {

using diffseg::bind::dtype_str;
using diffseg::bind::kind_size;
using diffseg::cc::Shape;
using diffseg::cc::Workspace;

Shape shape_of(const py::array& a) { return Shape{a.shape(0), a.shape(1), a.shape(2)}; }

void check_connectivity(int connectivity) {
    if (connectivity != 6 && connectivity != 18 && connectivity != 26)
        throw std::invalid_argument("connectivity must be 6, 18 or 26, got " + std::to_string(connectivity));
}

// Runs the labelling on a mask of any supported dtype (GIL released).
void label_any(Workspace& ws, const py::array& mask, int connectivity, bool multilabel, int threads) {
    diffseg::bind::require_volume(mask, "mask");
    check_connectivity(connectivity);
    const std::string k = kind_size(mask);
    const Shape s = shape_of(mask);
    const void* p = mask.data();
    py::gil_scoped_release nogil;
    if (k == "u1" || k == "b1" || k == "i1")
        diffseg::cc::label_runs<std::uint8_t>(ws, static_cast<const std::uint8_t*>(p), s, connectivity, multilabel,
                                              threads);
    else if (k == "u2" || k == "i2")
        diffseg::cc::label_runs<std::uint16_t>(ws, static_cast<const std::uint16_t*>(p), s, connectivity,
                                               multilabel, threads);
    else if (k == "u4" || k == "i4")
        diffseg::cc::label_runs<std::uint32_t>(ws, static_cast<const std::uint32_t*>(p), s, connectivity,
                                               multilabel, threads);
    else if (k == "u8" || k == "i8")
        diffseg::cc::label_runs<std::uint64_t>(ws, static_cast<const std::uint64_t*>(p), s, connectivity,
                                               multilabel, threads);
    else
        throw py::type_error("mask must hold integers or booleans, got " + k);
}

std::string smallest_label_dtype(std::int64_t n) {
    if (n <= std::numeric_limits<std::uint8_t>::max()) return "uint8";
    if (n <= std::numeric_limits<std::uint16_t>::max()) return "uint16";
    if (n <= std::numeric_limits<std::uint32_t>::max()) return "uint32";
    return "uint64";
}

std::int64_t dtype_capacity(const std::string& k) {
    if (k == "u1") return std::numeric_limits<std::uint8_t>::max();
    if (k == "u2") return std::numeric_limits<std::uint16_t>::max();
    if (k == "u4") return std::numeric_limits<std::uint32_t>::max();
    if (k == "i4") return std::numeric_limits<std::int32_t>::max();
    if (k == "u8" || k == "i8") return std::numeric_limits<std::int64_t>::max();
    return -1;
}

// A paint touches only the rows that hold runs. When few do, small pages keep the untouched ones unmaterialised
// (numpy's own zeroed arrays get transparent huge pages, and a 2 MiB page is zeroed as a whole on first touch).
bool sparse_output(const Workspace& ws) {
    const std::int64_t rows = ws.shape.rows();
    return rows > 0 && diffseg::cc::rows_with_runs(ws) * 4 < rows;
}

// A new zeroed C-ordered array shaped like `like`, on pages mapped here and released with the array.
py::array zeroed_array(const py::array& like, const py::dtype& dt, bool sparse) {
    struct Mapping {
        void* data;
        std::size_t bytes;
    };
    std::size_t bytes = static_cast<std::size_t>(dt.itemsize());
    for (py::ssize_t i = 0; i < like.ndim(); ++i) bytes *= static_cast<std::size_t>(like.shape(i));
    auto* mapping = new Mapping{diffseg::map_bytes(bytes, !sparse), bytes};
    py::capsule owner(mapping, [](void* p) {
        auto* m = static_cast<Mapping*>(p);
        diffseg::unmap_bytes(m->data, m->bytes);
        delete m;
    });
    std::vector<py::ssize_t> shape(like.shape(), like.shape() + like.ndim());
    return py::array(dt, shape, mapping->data, owner);
}

// The labels array: `out` (checked) or a new zeroed array of `dtype` (None: the smallest unsigned type for n).
py::array labels_array(const Workspace& ws, const py::array& mask, const py::object& out, const py::object& dtype,
                       bool& zero_background) {
    const std::int64_t n = ws.n_components;
    if (!out.is_none()) {
        py::array o = py::reinterpret_borrow<py::array>(out);
        diffseg::bind::require_volume(o, "out");
        diffseg::bind::require_writeable(o, "out");
        diffseg::bind::require_same_shape(o, mask, "out", "mask");
        const std::int64_t cap = dtype_capacity(kind_size(o));
        if (cap < 0)
            throw py::type_error("out must be uint8, uint16, uint32, int32, uint64 or int64, got " + dtype_str(o));
        if (n > cap)
            throw std::invalid_argument("out has dtype " + dtype_str(o) + " but the volume has " + std::to_string(n) +
                                        " components");
        zero_background = true;
        return o;
    }
    std::string name = dtype.is_none() ? smallest_label_dtype(n) : py::str(dtype).cast<std::string>();
    py::dtype dt(name);
    const std::string k = std::string(1, dt.kind()) + std::to_string(dt.itemsize());
    const std::int64_t cap = dtype_capacity(k);
    if (cap < 0) throw py::type_error("dtype must be uint8, uint16, uint32, int32, uint64 or int64, got " + name);
    if (n > cap)
        throw std::invalid_argument("dtype " + name + " cannot hold " + std::to_string(n) + " components");
    zero_background = false;
    return zeroed_array(mask, dt, sparse_output(ws));
}

void paint_any(const Workspace& ws, py::array& labels, bool zero_background, int threads) {
    const std::string k = kind_size(labels);
    void* p = labels.mutable_data();
    py::gil_scoped_release nogil;
    if (k == "u1")
        diffseg::cc::paint_labels<std::uint8_t>(ws, static_cast<std::uint8_t*>(p), zero_background, threads);
    else if (k == "u2")
        diffseg::cc::paint_labels<std::uint16_t>(ws, static_cast<std::uint16_t*>(p), zero_background, threads);
    else if (k == "u4" || k == "i4")
        diffseg::cc::paint_labels<std::uint32_t>(ws, static_cast<std::uint32_t*>(p), zero_background, threads);
    else
        diffseg::cc::paint_labels<std::uint64_t>(ws, static_cast<std::uint64_t*>(p), zero_background, threads);
}

// Per-run intensity sums and maxima (GIL released).
void intensity_any(Workspace& ws, const py::array& intensity, const py::array& mask, int threads) {
    diffseg::bind::require_volume(intensity, "intensity");
    diffseg::bind::require_same_shape(intensity, mask, "intensity", "mask");
    const std::string k = kind_size(intensity);
    const void* p = intensity.data();
    py::gil_scoped_release nogil;
    if (k == "f4")
        diffseg::cc::run_intensity<float>(ws, static_cast<const float*>(p), threads);
    else if (k == "f8")
        diffseg::cc::run_intensity<double>(ws, static_cast<const double*>(p), threads);
    else if (k == "i2")
        diffseg::cc::run_intensity<std::int16_t>(ws, static_cast<const std::int16_t*>(p), threads);
    else if (k == "u2")
        diffseg::cc::run_intensity<std::uint16_t>(ws, static_cast<const std::uint16_t*>(p), threads);
    else if (k == "u1")
        diffseg::cc::run_intensity<std::uint8_t>(ws, static_cast<const std::uint8_t*>(p), threads);
    else if (k == "i4")
        diffseg::cc::run_intensity<std::int32_t>(ws, static_cast<const std::int32_t*>(p), threads);
    else
        throw py::type_error("intensity must be float32, float64, int16, uint16, uint8 or int32, got " + k);
}

// Allocates the statistics arrays, reduces runs into them, and returns them as a dict.
template <class ComponentOf>
py::dict stats_dict(const Workspace& ws, std::int64_t n, bool with_intensity, ComponentOf&& component_of) {
    py::array_t<std::int64_t> count(n);
    py::array_t<std::int64_t> bbox(std::vector<py::ssize_t>{n, 6});
    py::array_t<double> centroid(std::vector<py::ssize_t>{n, 3});
    py::array_t<double> sum(with_intensity ? n : 0), max(with_intensity ? n : 0);
    diffseg::cc::StatsOut out;
    out.count = count.mutable_data();
    out.bbox = bbox.mutable_data();
    out.centroid = centroid.mutable_data();
    out.sum = with_intensity ? sum.mutable_data() : nullptr;
    out.max = with_intensity ? max.mutable_data() : nullptr;
    {
        py::gil_scoped_release nogil;
        diffseg::cc::reduce_stats(ws, n, with_intensity, out, component_of);
    }
    py::dict d;
    d["count"] = count;
    d["bbox"] = bbox;
    d["centroid"] = centroid;
    d["sum"] = with_intensity ? py::object(sum) : py::object(py::none());
    d["max"] = with_intensity ? py::object(max) : py::object(py::none());
    return d;
}

py::tuple connected_components(const py::array& mask, int connectivity, bool multilabel, const py::object& out,
                               const py::object& dtype, int threads) {
    auto ws = diffseg::cc::workspace_pool().acquire();
    label_any(*ws, mask, connectivity, multilabel, threads);
    bool zero_background = false;
    py::array labels = labels_array(*ws, mask, out, dtype, zero_background);
    paint_any(*ws, labels, zero_background, threads);
    return py::make_tuple(labels, ws->n_components);
}

py::tuple label_with_stats(const py::array& mask, int connectivity, bool multilabel, const py::object& intensity,
                           const py::object& out, const py::object& dtype, int threads) {
    auto ws = diffseg::cc::workspace_pool().acquire();
    label_any(*ws, mask, connectivity, multilabel, threads);
    const bool with_intensity = !intensity.is_none();
    if (with_intensity) intensity_any(*ws, py::reinterpret_borrow<py::array>(intensity), mask, threads);
    bool zero_background = false;
    py::array labels = labels_array(*ws, mask, out, dtype, zero_background);
    paint_any(*ws, labels, zero_background, threads);
    const Workspace& w = *ws;
    py::dict stats = stats_dict(w, w.n_components, with_intensity,
                                [&w](std::int64_t i) { return static_cast<std::uint64_t>(w.label[i]); });
    return py::make_tuple(labels, w.n_components, stats);
}

py::dict component_stats(const py::array& labels, std::int64_t n, const py::object& intensity, int threads) {
    diffseg::bind::require_volume(labels, "labels");
    if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
    auto ws = diffseg::cc::workspace_pool().acquire();
    {
        const std::string k = kind_size(labels);
        const Shape s = shape_of(labels);
        const void* p = labels.data();
        py::gil_scoped_release nogil;
        if (k == "u1" || k == "b1")
            diffseg::cc::collect_runs<std::uint8_t>(*ws, static_cast<const std::uint8_t*>(p), s, threads);
        else if (k == "u2")
            diffseg::cc::collect_runs<std::uint16_t>(*ws, static_cast<const std::uint16_t*>(p), s, threads);
        else if (k == "u4" || k == "i4")
            diffseg::cc::collect_runs<std::uint32_t>(*ws, static_cast<const std::uint32_t*>(p), s, threads);
        else if (k == "u8" || k == "i8")
            diffseg::cc::collect_runs<std::uint64_t>(*ws, static_cast<const std::uint64_t*>(p), s, threads);
        else
            throw py::type_error("labels must be uint8, uint16, uint32, int32, uint64 or int64, got " + k);
    }
    const bool with_intensity = !intensity.is_none();
    if (with_intensity) intensity_any(*ws, py::reinterpret_borrow<py::array>(intensity), labels, threads);
    const Workspace& w = *ws;
    return stats_dict(w, n, with_intensity, [&w](std::int64_t i) { return w.values[i]; });
}

template <class T>
void paint_kept_typed(const Workspace& ws, const py::array& mask, py::array& out, const std::uint8_t* keep,
                      bool zero_background, int threads) {
    const T* in = static_cast<const T*>(mask.data());
    T* o = static_cast<T*>(out.mutable_data());
    py::gil_scoped_release nogil;
    diffseg::cc::paint_kept<T>(ws, in, o, keep, zero_background, threads);
}

py::tuple remove_small(const py::array& mask, int connectivity, bool multilabel, std::int64_t min_voxels,
                       std::int64_t keep_largest, const py::object& out, int threads) {
    auto ws = diffseg::cc::workspace_pool().acquire();
    label_any(*ws, mask, connectivity, multilabel, threads);
    const std::int64_t n = ws->n_components;
    std::vector<std::int64_t> counts(static_cast<std::size_t>(n));
    std::vector<std::uint8_t> keep(static_cast<std::size_t>(n) + 1);
    std::int64_t kept;
    {
        py::gil_scoped_release nogil;
        diffseg::cc::component_sizes(*ws, counts.data());
        kept = diffseg::cc::select_components(counts.data(), n, min_voxels, keep_largest, keep.data());
    }
    py::array result;
    bool zero_background;
    if (out.is_none()) {
        result = zeroed_array(mask, mask.dtype(), sparse_output(*ws));
        zero_background = false;
    } else {
        result = py::reinterpret_borrow<py::array>(out);
        diffseg::bind::require_volume(result, "out");
        diffseg::bind::require_writeable(result, "out");
        diffseg::bind::require_same_shape(result, mask, "out", "mask");
        if (kind_size(result) != kind_size(mask))
            throw std::invalid_argument("out must have the mask's dtype " + dtype_str(mask) + ", got " +
                                        dtype_str(result));
        zero_background = true;
    }
    switch (mask.itemsize()) {
        case 1: paint_kept_typed<std::uint8_t>(*ws, mask, result, keep.data(), zero_background, threads); break;
        case 2: paint_kept_typed<std::uint16_t>(*ws, mask, result, keep.data(), zero_background, threads); break;
        case 4: paint_kept_typed<std::uint32_t>(*ws, mask, result, keep.data(), zero_background, threads); break;
        default: paint_kept_typed<std::uint64_t>(*ws, mask, result, keep.data(), zero_background, threads); break;
    }
    return py::make_tuple(result, n, kept);
}

}  // namespace

void register_components(py::module_& m) {
    m.def("connected_components", &connected_components, py::arg("mask"), py::arg("connectivity") = 26,
          py::arg("multilabel") = true, py::arg("out") = py::none(), py::arg("dtype") = py::none(),
          py::arg("threads") = 0,
          "Label the connected components of a [z, y, x] mask (6/18/26-connectivity). multilabel: runs of\n"
          "different non-zero values are different components (cc3d); otherwise any non-zero is foreground\n"
          "(scipy.ndimage.label). Components are numbered in raster order of their first voxel. Returns\n"
          "(labels, n); labels is `out` or a new array of `dtype` (None: the smallest unsigned type for n).");
    m.def("label_with_stats", &label_with_stats, py::arg("mask"), py::arg("connectivity") = 26,
          py::arg("multilabel") = true, py::arg("intensity") = py::none(), py::arg("out") = py::none(),
          py::arg("dtype") = py::none(), py::arg("threads") = 0,
          "connected_components plus per-component statistics from the same runs. Returns (labels, n, stats)\n"
          "with stats = {count [n], bbox [n, 6] (z0, y0, x0, z1, y1, x1; stop exclusive), centroid [n, 3]\n"
          "(mean z, y, x index), sum [n] and max [n] of `intensity` or None}.");
    m.def("component_stats", &component_stats, py::arg("labels"), py::arg("n"), py::arg("intensity") = py::none(),
          py::arg("threads") = 0, "Statistics (as label_with_stats) of components 1..n of a label image.");
    m.def("remove_small", &remove_small, py::arg("mask"), py::arg("connectivity") = 26,
          py::arg("multilabel") = true, py::arg("min_voxels") = 0, py::arg("keep_largest") = -1,
          py::arg("out") = py::none(), py::arg("threads") = 0,
          "Zero the components under min_voxels and, if keep_largest >= 0, all but the keep_largest largest\n"
          "(ties: the first in raster order). Returns (cleaned mask, components found, components kept).");
}
