// Python binding of the reverse-diffusion step kernel (diffseg/diffusion_step.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bind_common.hpp"
#include "diffseg/diffusion_step.hpp"

namespace py = pybind11;

namespace {

using diffseg::bind::shape_str;
namespace step = diffseg::step;

// A C-contiguous float32 array, or ValueError naming `what`.
void require_f4(const py::array& a, const char* what) {
    if (diffseg::bind::kind_size(a) != "f4")
        throw std::invalid_argument(std::string(what) + " must be float32, got " + diffseg::bind::dtype_str(a));
    if (!(a.flags() & py::array::c_style))
        throw std::invalid_argument(std::string(what) + " must be C-contiguous (use numpy.ascontiguousarray)");
}

const float* input(const py::object& obj, const py::array& like, const char* what) {
    if (obj.is_none()) return nullptr;
    auto a = obj.cast<py::array>();
    require_f4(a, what);
    diffseg::bind::require_same_shape(a, like, what, "x_t");
    return static_cast<const float*>(a.data());
}

float* output(const py::object& obj, const py::array& like, const char* what) {
    if (obj.is_none()) return nullptr;
    auto a = obj.cast<py::array>();
    require_f4(a, what);
    diffseg::bind::require_same_shape(a, like, what, "x_t");
    diffseg::bind::require_writeable(a, what);
    return static_cast<float*>(a.mutable_data());
}

double number(const py::dict& d, const char* key) {
    if (!d.contains(key)) throw std::invalid_argument(std::string("coefficients lack '") + key + "'");
    return d[key].cast<double>();
}

step::Coefficients coefficients(const py::dict& d) {
    step::Coefficients c;
    c.a_out = number(d, "a_out");
    c.a_x = number(d, "a_x");
    c.clip = d.contains("clip") && !d["clip"].is_none();
    if (c.clip) c.clip_range = d["clip"].cast<double>();
    c.A = number(d, "A");
    c.B = number(d, "B");
    c.C = number(d, "C");
    const std::string kind = d.contains("noise") ? d["noise"].cast<std::string>() : "none";
    if (kind == "constant") {
        c.noise = step::Noise::constant;
        c.sigma = number(d, "sigma");
    } else if (kind == "learned") {
        c.noise = step::Noise::learned;
        c.L1 = number(d, "L1");
        c.L0 = number(d, "L0");
    } else if (kind != "none") {
        throw std::invalid_argument("coefficients['noise'] must be 'none', 'constant' or 'learned', got '" + kind + "'");
    }
    return c;
}

void diffusion_step(const py::array& model_output, const py::array& x_t, const py::dict& coef, py::object x_prev,
                    py::object x0, py::object noise, py::object variance, py::object scale, int threads) {
    require_f4(x_t, "x_t");
    step::Arrays a;
    a.x_t = static_cast<const float*>(x_t.data());
    a.n = x_t.size();
    a.model_output = input(model_output, x_t, "model_output");
    a.x_prev = output(x_prev, x_t, "x_prev");
    a.x0 = output(x0, x_t, "x0");
    const step::Coefficients c = coefficients(coef);
    if (c.noise != step::Noise::none) {
        if (noise.is_none()) throw std::invalid_argument("this step adds noise: pass noise");
        a.noise = input(noise, x_t, "noise");
    }
    if (c.noise == step::Noise::learned) {
        if (variance.is_none()) throw std::invalid_argument("a learned-variance step needs variance");
        a.variance = input(variance, x_t, "variance");
    }
    if (!scale.is_none()) {
        auto s = scale.cast<py::array>();
        require_f4(s, "scale");
        const py::ssize_t lead = x_t.ndim() - s.ndim();
        bool trailing = lead >= 0 && s.size() > 0;
        for (py::ssize_t i = 0; trailing && i < s.ndim(); ++i) trailing = s.shape(i) == x_t.shape(lead + i);
        if (!trailing)
            throw std::invalid_argument("scale has shape " + shape_str(s) + "; it must equal the trailing axes of x_t " +
                                        shape_str(x_t));
        a.scale = static_cast<const float*>(s.data());
        a.period = s.size();
    }
    // Each element is read before it is written, so outputs may be inputs; two outputs in one buffer may not.
    if (a.x0 && a.x0 == a.x_prev) throw std::invalid_argument("x0 and x_prev must be different buffers");
    py::gil_scoped_release nogil;
    step::run(c, a, threads);
}

}  // namespace

void register_diffusion(py::module_& m) {
    m.def("diffusion_step", &diffusion_step, py::arg("model_output"), py::arg("x_t"), py::arg("coefficients"),
          py::arg("x_prev") = py::none(), py::arg("x0") = py::none(), py::arg("noise") = py::none(),
          py::arg("variance") = py::none(), py::arg("scale") = py::none(), py::arg("threads") = 0,
          "One reverse-diffusion step in one pass over float32 arrays: x0 = clamp(a_out*m + a_x*x_t), "
          "x_prev = A*x0 + B*m + C*x_t + sigma*z, with m = model_output*scale; computed in double per element.");
}
