// The k4-s2 convolution with padding 1 (NHWC activations, HWIO kernels) and its two gradients,
// run by oneDNN as XLA FFI handlers for the CPU. Built and loaded by gan/models/onednn.py.
//
// Activations stay in XLA's NHWC layout; kernels are reordered (and, for bf16 compute, converted)
// into the layout oneDNN picks for the shape: with plain HWIO kernels oneDNN falls back to GEMM
// for both gradients, at half the speed. Calls run one at a time on one thread (`Worker`), on
// every core, with the scratchpad (user mode) and the reordered kernel in buffers they share.
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

memory::data_type OneDnnType(ffi::DataType type) {
  return type == ffi::DataType::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
}

// One convolution: src [N, H, W, C] -> dst [N, H/2, W/2, O] with kernel [4, 4, C, O]; `data` is
// the activations' type, `weights` the type of the caller's kernel (or kernel gradient).
struct Shape {
  memory::dim n, h, w, c, oh, ow, o;
  memory::data_type data, weights;

  bool operator<(const Shape& other) const {
    return std::tie(n, h, w, c, oh, ow, o, data, weights) <
           std::tie(other.n, other.h, other.w, other.c, other.oh, other.ow, other.o, other.data,
                    other.weights);
  }
  memory::desc Src() const { return memory::desc({n, c, h, w}, data, Tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, o, oh, ow}, data, Tag::nhwc); }
  memory::desc Kernel(memory::data_type type, Tag tag) const {
    return memory::desc({o, c, 4, 4}, type, tag);
  }
  dnnl::convolution_forward::primitive_desc Forward() const {
    return dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, Src(),
        Kernel(data, Tag::any), Dst(), {2, 2}, {1, 1}, {1, 1}, UserScratchpad());
  }
};

// A primitive with the reorder between the caller's HWIO kernel and the primitive's own layout.
struct Plan {
  dnnl::primitive primitive;
  memory::desc kernel, user_kernel;
  dnnl::reorder reorder;
  memory::desc scratchpad;
};

template <typename Primitive>
Plan MakePlan(const typename Primitive::primitive_desc& desc, const memory::desc& kernel,
              const memory::desc& user_kernel, bool to_user) {
  dnnl::reorder reorder = to_user ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                        Engine(), kernel, Engine(), user_kernel))
                                  : dnnl::reorder(dnnl::reorder::primitive_desc(
                                        Engine(), user_kernel, Engine(), kernel));
  return Plan{Primitive(desc), kernel, user_kernel, reorder,
              desc.scratchpad_desc()};
}

enum class Op { kForward, kBackwardData, kBackwardWeights };

const Plan& GetPlan(Op op, const Shape& shape) {
  static std::mutex mutex;
  static std::map<std::pair<Op, Shape>, Plan> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(op, shape);
  auto found = plans.find(key);
  if (found != plans.end()) return found->second;
  memory::desc user_kernel = shape.Kernel(shape.weights, Tag::hwio);
  auto forward = shape.Forward();
  Plan plan;
  if (op == Op::kForward) {
    plan = MakePlan<dnnl::convolution_forward>(forward, forward.weights_desc(), user_kernel, false);
  } else if (op == Op::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc desc(
        Engine(), dnnl::algorithm::convolution_direct, shape.Src(),
        shape.Kernel(shape.data, Tag::any), shape.Dst(), {2, 2}, {1, 1}, {1, 1}, forward,
        UserScratchpad());
    plan = MakePlan<dnnl::convolution_backward_data>(desc, desc.weights_desc(), user_kernel, false);
  } else {
    dnnl::convolution_backward_weights::primitive_desc desc(
        Engine(), dnnl::algorithm::convolution_direct, shape.Src(),
        shape.Kernel(shape.weights, Tag::any), shape.Dst(), {2, 2}, {1, 1}, {1, 1}, forward,
        UserScratchpad());
    plan = MakePlan<dnnl::convolution_backward_weights>(desc, desc.diff_weights_desc(), user_kernel, true);
  }
  return plans.emplace(key, std::move(plan)).first->second;
}

memory Wrap(const memory::desc& desc, void* data) { return memory(desc, Engine(), data); }

// Runs `task` on one thread kept for oneDNN, one task at a time, and waits for it. Each call takes
// every core through OpenMP, and XLA calls from any of its threads; GNU OpenMP keeps a team of
// workers for each thread that starts parallel work, and the idle teams' spinning workers would
// take cores from the running one. From one thread, there is one team.
class Worker {
 public:
  static Worker& Get() {
    static Worker* worker = new Worker();  // never destroyed: its thread lives with the process
    return *worker;
  }

  void Run(const std::function<void()>& task) {
    std::lock_guard<std::mutex> one_caller(caller_);
    std::unique_lock<std::mutex> lock(mutex_);
    task_ = &task;
    wake_.notify_one();
    done_.wait(lock, [this] { return task_ == nullptr; });
  }

 private:
  Worker() : thread_([this] { Loop(); }) { thread_.detach(); }

  void Loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      wake_.wait(lock, [this] { return task_ != nullptr; });
      (*task_)();
      task_ = nullptr;
      done_.notify_one();
    }
  }

  std::mutex caller_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void()>* task_ = nullptr;
  std::thread thread_;
};

// Runs `op` for `shape` with `args` (activations) and the kernel at `user_kernel` in the caller's
// layout: reordered in before a forward or data-gradient pass, out after a kernel-gradient pass.
// The scratchpad and the kernel's buffer are kept and reused (calls run one at a time): fresh ones
// would be zeroed and page-faulted in on every call.
ffi::Error Execute(Op op, const Shape& shape, std::unordered_map<int, memory> args,
                   void* user_kernel) {
  std::string failure;
  try {
    const Plan& plan = GetPlan(op, shape);
    Worker::Get().Run([&] {
      try {
        static std::vector<uint8_t> scratchpad, kernel;
        if (scratchpad.size() < plan.scratchpad.get_size()) {
          scratchpad.resize(plan.scratchpad.get_size());
        }
        if (kernel.size() < plan.kernel.get_size()) kernel.resize(plan.kernel.get_size());
        dnnl::stream stream(Engine());
        memory own = Wrap(plan.kernel, kernel.data()), user = Wrap(plan.user_kernel, user_kernel);
        args.emplace(DNNL_ARG_SCRATCHPAD, Wrap(plan.scratchpad, scratchpad.data()));
        if (op == Op::kBackwardWeights) {
          args.emplace(DNNL_ARG_DIFF_WEIGHTS, own);
          plan.primitive.execute(stream, args);
          plan.reorder.execute(stream, own, user);
        } else {
          plan.reorder.execute(stream, user, own);
          args.emplace(DNNL_ARG_WEIGHTS, own);
          plan.primitive.execute(stream, args);
        }
        stream.wait();
      } catch (const dnnl::error& error) {
        failure = error.what();
      }
    });
  } catch (const dnnl::error& error) {
    failure = error.what();
  }
  if (failure.empty()) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN: " + failure);
}

Shape ShapeOf(ffi::Span<const int64_t> src, ffi::Span<const int64_t> dst, ffi::DataType data,
              ffi::DataType weights) {
  return Shape{src[0], src[1], src[2], src[3], dst[1], dst[2], dst[3], OneDnnType(data),
               OneDnnType(weights)};
}

ffi::Error Forward(ffi::AnyBuffer src, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> dst) {
  Shape shape = ShapeOf(src.dimensions(), dst->dimensions(), src.element_type(),
                        kernel.element_type());
  return Execute(Op::kForward, shape,
                 {{DNNL_ARG_SRC, Wrap(shape.Src(), src.untyped_data())},
                  {DNNL_ARG_DST, Wrap(shape.Dst(), dst->untyped_data())}},
                 kernel.untyped_data());
}

ffi::Error BackwardData(ffi::AnyBuffer diff_dst, ffi::AnyBuffer kernel,
                        ffi::Result<ffi::AnyBuffer> diff_src) {
  Shape shape = ShapeOf(diff_src->dimensions(), diff_dst.dimensions(), diff_dst.element_type(),
                        kernel.element_type());
  return Execute(Op::kBackwardData, shape,
                 {{DNNL_ARG_DIFF_DST, Wrap(shape.Dst(), diff_dst.untyped_data())},
                  {DNNL_ARG_DIFF_SRC, Wrap(shape.Src(), diff_src->untyped_data())}},
                 kernel.untyped_data());
}

ffi::Error BackwardWeights(ffi::AnyBuffer src, ffi::AnyBuffer diff_dst,
                           ffi::Result<ffi::AnyBuffer> diff_kernel) {
  Shape shape = ShapeOf(src.dimensions(), diff_dst.dimensions(), src.element_type(),
                        diff_kernel->element_type());
  return Execute(Op::kBackwardWeights, shape,
                 {{DNNL_ARG_SRC, Wrap(shape.Src(), src.untyped_data())},
                  {DNNL_ARG_DIFF_DST, Wrap(shape.Dst(), diff_dst.untyped_data())}},
                 diff_kernel->untyped_data());
}

}  // namespace

// Each takes two arrays and returns one: (x, kernel) -> y; (dy, kernel) -> dx; (x, dy) -> dkernel.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GanConvForward, Forward,
    ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GanConvBackwardData, BackwardData,
    ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GanConvBackwardWeights, BackwardWeights,
    ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
