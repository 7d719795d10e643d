// A C API over torch::inductor::AOTIModelPackageLoader (PyTorch 2 AOTInductor
// packages, .pt2) for src/aoti.rs. Every function catches every C++ exception
// and returns it as a message (NULL on success, else a string from malloc that
// the caller frees with ss_aoti_free_error); nothing throws across the C
// boundary. Tensors cross as pointers to at::Tensor, the layout tch's C_tensor
// points to: inputs are borrowed, each output is a new heap at::Tensor handed
// to the callback, which owns it from then on (tch frees it with `delete`).

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

char* error_copy(const char* what) {
  size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, what, n + 1);
  }
  return out;
}

// Runs f; returns NULL, or the exception's message.
template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return error_copy(e.what());
  } catch (...) {
    return error_copy("unknown C++ exception");
  }
}

}  // namespace

extern "C" {

struct ss_aoti {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

typedef void (*ss_str_cb)(void* ctx, const char* s, size_t len);
typedef void (*ss_kv_cb)(void* ctx, const char* k, size_t klen, const char* v, size_t vlen);
typedef void (*ss_tensor_cb)(void* ctx, at::Tensor* t);

void ss_aoti_free_error(char* e) { std::free(e); }

// Makes every package loaded afterwards check its inputs (dtype, sizes,
// strides, device) before it reads them: AOTInductor's generated code reads
// this variable once, at a package's first run. Called by ss_aoti_load, once.
static void enable_input_checks() {
  static std::once_flag once;
  std::call_once(once, [] { setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", 1); });
}

char* ss_aoti_load(const char* path, const char* model_name, size_t num_runners,
                   int device_index, ss_aoti** out) {
  *out = nullptr;
  return guarded([&] {
    enable_input_checks();
    auto handle = std::make_unique<ss_aoti>();
    handle->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        path, model_name, /*run_single_threaded=*/false, num_runners,
        static_cast<c10::DeviceIndex>(device_index));
    *out = handle.release();
  });
}

void ss_aoti_free(ss_aoti* p) {
  try {
    delete p;
  } catch (...) {
  }
}

char* ss_aoti_run(ss_aoti* p, const at::Tensor* const* inputs, size_t n, ss_tensor_cb cb,
                  void* ctx) {
  return guarded([&] {
    std::vector<at::Tensor> in;
    in.reserve(n);
    for (size_t i = 0; i < n; i++) {
      in.push_back(*inputs[i]);
    }
    std::vector<at::Tensor> outs = p->loader->run(in);
    for (auto& t : outs) {
      cb(ctx, new at::Tensor(std::move(t)));
    }
  });
}

char* ss_aoti_metadata(ss_aoti* p, ss_kv_cb cb, void* ctx) {
  return guarded([&] {
    for (const auto& [k, v] : p->loader->get_metadata()) {
      cb(ctx, k.data(), k.size(), v.data(), v.size());
    }
  });
}

// The package's metadata without loading it (its device, before a load that
// would fail).
char* ss_aoti_package_metadata(const char* path, const char* model_name, ss_kv_cb cb, void* ctx) {
  return guarded([&] {
    auto meta =
        torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, model_name);
    for (const auto& [k, v] : meta) {
      cb(ctx, k.data(), k.size(), v.data(), v.size());
    }
  });
}

// The call spec: the pytree specs of the inputs and of the outputs, in that order.
char* ss_aoti_call_spec(ss_aoti* p, ss_str_cb cb, void* ctx) {
  return guarded([&] {
    for (const auto& s : p->loader->get_call_spec()) {
      cb(ctx, s.data(), s.size());
    }
  });
}

// The first record of the package whose name ends with `suffix`, at most
// `max_bytes` long (none: nothing is called back).
char* ss_aoti_read_record(const char* path, const char* suffix, size_t max_bytes, ss_str_cb cb,
                          void* ctx) {
  return guarded([&] {
    caffe2::serialize::PyTorchStreamReader reader{std::string(path)};
    std::string want(suffix);
    for (const auto& name : reader.getAllRecords()) {
      if (name.size() >= want.size() &&
          name.compare(name.size() - want.size(), want.size(), want) == 0) {
        auto [data, size] = reader.getRecord(name);
        if (size <= max_bytes) {
          cb(ctx, static_cast<const char*>(data.get()), size);
        }
        return;
      }
    }
  });
}

}  // extern "C"
