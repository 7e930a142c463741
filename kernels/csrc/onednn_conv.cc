// The k4-s2 convolution with padding 1 (NHWC activations, HWIO kernels) and its two gradients,
// run by oneDNN as XLA FFI handlers for the CPU. Built by setup.py at install; loaded and
// registered by gan_cpu_kernels/_ffi.py.
//
// Activations stay in XLA's NHWC layout; kernels are reordered (and, for bf16 compute, converted)
// into the layout oneDNN picks for the shape: with plain HWIO kernels oneDNN falls back to GEMM
// for both gradients, at half the speed. Calls run one at a time on one thread (`Worker`), on
// every core, with the scratchpad (user mode) and the reordered kernel in buffers they share.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
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
  dnnl::reorder reorder =
      to_user
          ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), kernel, Engine(), user_kernel))
          : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user_kernel, Engine(), kernel));
  return Plan{Primitive(desc), kernel, user_kernel, reorder, desc.scratchpad_desc()};
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
    plan = MakePlan<dnnl::convolution_backward_weights>(desc, desc.diff_weights_desc(), user_kernel,
                                                        true);
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

// Shared by the forms below: oneDNN's matrix products, per-thread buffers, parallel loops.

// Scratch memory for one thread, kept between calls.
struct Scratch {
  std::vector<float> z, rows;
  float* Z(int64_t size) { return Resized(z, size); }
  float* Rows(int64_t size) { return Resized(rows, size); }
  template <typename T>
  static T* Resized(std::vector<T>& buffer, int64_t size) {
    if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
    return buffer.data();
  }
};

// `batch` products [rows, inner] x [inner, cols] of `in` operands (either stored transposed) into
// `out`, accumulated in float32.
struct Product {
  dnnl::matmul primitive;
  memory::desc a, b, c, scratchpad;
};

memory::desc Batched(int64_t batch, int64_t rows, int64_t cols, bool transposed,
                     memory::data_type type) {
  return memory::desc(
      {batch, rows, cols}, type,
      transposed ? memory::dims{rows * cols, 1, rows} : memory::dims{rows * cols, cols, 1});
}

const Product& GetProduct(int64_t batch, int64_t rows, int64_t inner, int64_t cols,
                          bool a_transposed, bool b_transposed,
                          memory::data_type in = memory::data_type::f32,
                          memory::data_type out = memory::data_type::f32) {
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, memory::data_type,
                             memory::data_type>,
                  Product>
      products;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(batch, rows, inner, cols, a_transposed, b_transposed, in, out);
  auto found = products.find(key);
  if (found != products.end()) return found->second;
  Product p;
  p.a = Batched(batch, rows, inner, a_transposed, in);
  p.b = Batched(batch, inner, cols, b_transposed, in);
  p.c = Batched(batch, rows, cols, false, out);
  dnnl::matmul::primitive_desc desc(Engine(), p.a, p.b, p.c, UserScratchpad());
  p.primitive = dnnl::matmul(desc);
  p.scratchpad = desc.scratchpad_desc();
  return products.emplace(key, std::move(p)).first->second;
}

// Computes c = a b (on the calling thread alone when called inside a parallel region).
void Multiply(const Product& p, const void* a, const void* b, void* c,
              std::vector<uint8_t>& scratchpad) {
  if (scratchpad.size() < p.scratchpad.get_size()) scratchpad.resize(p.scratchpad.get_size());
  dnnl::stream stream(Engine());
  p.primitive.execute(stream, {{DNNL_ARG_SRC, Wrap(p.a, const_cast<void*>(a))},
                               {DNNL_ARG_WEIGHTS, Wrap(p.b, const_cast<void*>(b))},
                               {DNNL_ARG_DST, Wrap(p.c, c)},
                               {DNNL_ARG_SCRATCHPAD, Wrap(p.scratchpad, scratchpad.data())}});
  stream.wait();
}

// Per-thread buffers, kept between calls.
struct ThreadBuffers {
  Scratch scratch;
  std::vector<float> transformed, products;
  std::vector<uint8_t> scratchpad;
};

ThreadBuffers& Buffers() {
  static std::vector<ThreadBuffers> buffers(omp_get_max_threads());
  return buffers[omp_get_thread_num()];
}

// Runs stage(i, buffers) for i < count (tiles, images or blocks), split over the cores; an
// exception (oneDNN's) is thrown again after the loop, since none may leave a parallel region.
template <typename F>
void ForEach(int64_t count, F stage) {
  std::string failure;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    try {
      stage(i, Buffers());
    } catch (const std::exception& error) {
#pragma omp critical
      failure = error.what();
    }
  }
  if (!failure.empty()) throw std::runtime_error(failure);
}

// Winograd F(4x4, 2x2) for float32.
//
// The k4-s2 convolution is a k2-s1 convolution of z = space-to-depth(pad(x, 1)) (K = 4C channels
// in (u, v, c) order) with w2[s, t, (u, v, c), o] = w[2s + u, 2t + v, c, o]. Winograd's minimal
// filtering computes each 4 x 4 tile of its output from a 5 x 5 tile of z with 25 products per
// channel pair instead of 64: y = A^T [(G w2 G^T) . (B^T z B)] A, the products being 25 matrix
// products over the channels, done by oneDNN. The gradients are the same transforms transposed.
// Interpolation points 0, 1, -1, 2 and infinity.
namespace winograd {

constexpr int kM = 4;  // output tile
constexpr int kN = 5;  // input tile
constexpr int kNN = kN * kN;

// From the points (Lavin and Gray, 2016, by Toom-Cook): G and A evaluate the kernel's and a
// tile's polynomials at each point (the row for infinity takes the leading coefficient), and B^T
// is the transposed inverse of the 5 x 5 Vandermonde matrix of the points.
constexpr float kBT[kN][kN] = {{1, -0.5f, -1, 0.5f, 0},
                               {0, 1, 0.5f, -0.5f, 0},
                               {0, -1 / 3.f, 0.5f, -1 / 6.f, 0},
                               {0, -1 / 6.f, 0, 1 / 6.f, 0},
                               {0, 2, -1, -2, 1}};
constexpr float kG[kN][2] = {{1, 0}, {1, 1}, {1, -1}, {1, 2}, {0, 1}};
constexpr float kAT[kM][kN] = {
    {1, 1, 1, 1, 0}, {0, 1, -1, 2, 0}, {0, 1, 1, 4, 0}, {0, 1, -1, 8, 1}};

struct BTMatrix {
  float operator()(int i, int j) const { return kBT[i][j]; }
};
struct BMatrix {
  float operator()(int i, int j) const { return kBT[j][i]; }
};
struct ATMatrix {
  float operator()(int i, int j) const { return kAT[i][j]; }
};
struct AMatrix {
  float operator()(int i, int j) const { return kAT[j][i]; }
};

// out[i * out_stride + l] = sum_j m(i, j) in[j * in_stride + l] for l < len.
template <int Rows, int Cols, typename Matrix>
void Apply(const float* in, int64_t in_stride, float* out, int64_t out_stride, int64_t len) {
  const Matrix m;
  for (int i = 0; i < Rows; ++i) {
    float* o = out + i * out_stride;
    std::fill(o, o + len, 0.f);
    for (int j = 0; j < Cols; ++j) {
      const float c = m(i, j);
      if (c == 0) continue;
      const float* p = in + j * in_stride;
      for (int64_t l = 0; l < len; ++l) o[l] += c * p[l];
    }
  }
}

// x [n, h, w, c] -> y [n, h/2, w/2, o], in 4 x 4 tiles of y numbered image by image, row by row.
// Transformed tiles are stored [25][tiles][channels], `stride` tiles apart.
struct Geometry {
  int64_t n, h, w, c, o;

  static bool Fits(int64_t h, int64_t w) { return h % (2 * kM) == 0 && w % (2 * kM) == 0; }
  int64_t K() const { return 4 * c; }
  int64_t TileRows() const { return h / 2 / kM; }
  int64_t TileCols() const { return w / 2 / kM; }
  int64_t TilesPerImage() const { return TileRows() * TileCols(); }
  int64_t Tiles() const { return n * TilesPerImage(); }

  // x's C channels under position (a, b) of tile t's z, channel block (u, v); null in the padding.
  template <typename T>
  T* XAt(T* x, int64_t t, int a, int b, int u, int v) const {
    const int64_t image = t / TilesPerImage(), tile_row = t / TileCols() % TileRows();
    const int64_t row = 2 * (tile_row * kM + a) + u - 1;
    const int64_t col = 2 * (t % TileCols() * kM + b) + v - 1;
    if (row < 0 || row >= h || col < 0 || col >= w) return nullptr;
    return x + ((image * h + row) * w + col) * c;
  }
  // y's O channels at position (p, q) of tile t.
  template <typename T>
  T* YAt(T* y, int64_t t, int p, int q) const {
    const int64_t image = t / TilesPerImage(), tile_row = t / TileCols() % TileRows();
    return y + ((image * h / 2 + tile_row * kM + p) * (w / 2) + t % TileCols() * kM + q) * o;
  }
};

// v[(i * 5 + j) * stride * K] (K floats each) = (B^T z B)[i][j] for tile t of z.
void InputTile(const Geometry& g, const float* x, int64_t t, float* v, int64_t stride,
               Scratch& scratch) {
  const int64_t K = g.K();
  float* z = scratch.Z(kNN * K);
  float* rows = scratch.Rows(kNN * K);
  for (int a = 0; a < kN; ++a)
    for (int b = 0; b < kN; ++b)
      for (int uv = 0; uv < 4; ++uv) {
        float* out = z + (a * kN + b) * K + uv * g.c;
        const float* in = g.XAt(x, t, a, b, uv / 2, uv % 2);
        if (in)
          std::copy(in, in + g.c, out);
        else
          std::fill(out, out + g.c, 0.f);
      }
  for (int b = 0; b < kN; ++b) Apply<kN, kN, BTMatrix>(z + b * K, kN * K, rows + b * K, kN * K, K);
  for (int i = 0; i < kN; ++i)
    Apply<kN, kN, BTMatrix>(rows + i * kN * K, K, v + i * kN * stride * K, stride * K, K);
}

// Adds B dV B^T for tile t (laid out as InputTile writes it) into dx.
void InputTileBack(const Geometry& g, const float* dv, int64_t stride, int64_t t, float* dx,
                   Scratch& scratch) {
  const int64_t K = g.K();
  float* rows = scratch.Rows(kNN * K);
  float* z = scratch.Z(kNN * K);
  for (int j = 0; j < kN; ++j)
    Apply<kN, kN, BMatrix>(dv + j * stride * K, kN * stride * K, rows + j * K, kN * K, K);
  for (int a = 0; a < kN; ++a) Apply<kN, kN, BMatrix>(rows + a * kN * K, K, z + a * kN * K, K, K);
  for (int a = 0; a < kN; ++a)
    for (int b = 0; b < kN; ++b)
      for (int uv = 0; uv < 4; ++uv) {
        float* out = g.XAt(dx, t, a, b, uv / 2, uv % 2);
        if (!out) continue;
        const float* in = z + (a * kN + b) * K + uv * g.c;
        for (int64_t c = 0; c < g.c; ++c) out[c] += in[c];
      }
}

// y's tile t = A^T M A, M laid out [25][stride][O] from m.
void OutputTile(const Geometry& g, const float* m, int64_t stride, int64_t t, float* y,
                Scratch& scratch) {
  const int64_t O = g.o;
  float* rows = scratch.Rows(kM * kN * O);
  for (int j = 0; j < kN; ++j)
    Apply<kM, kN, ATMatrix>(m + j * stride * O, kN * stride * O, rows + j * O, kN * O, O);
  for (int p = 0; p < kM; ++p)
    Apply<kM, kN, ATMatrix>(rows + p * kN * O, O, g.YAt(y, t, p, 0), O, O);
}

// dm [25][stride][O] = A dy A^T for y's tile t.
void OutputTileBack(const Geometry& g, const float* dy, int64_t t, float* dm, int64_t stride,
                    Scratch& scratch) {
  const int64_t O = g.o;
  float* rows = scratch.Rows(kN * kM * O);
  for (int q = 0; q < kM; ++q)
    Apply<kN, kM, AMatrix>(g.YAt(dy, t, 0, q), g.w / 2 * O, rows + q * O, kM * O, O);
  for (int i = 0; i < kN; ++i)
    Apply<kN, kM, AMatrix>(rows + i * kM * O, O, dm + i * kN * stride * O, stride * O, O);
}

// U [25][K][O] = G w2 G^T for the HWIO kernel w; with `back`, w = the transpose applied to U.
void KernelTransform(const Geometry& g, float* w, float* u, bool back) {
  const int64_t C = g.c, O = g.o, K = g.K();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < K; ++k) {
    const int64_t uv = k / C, c = k % C;
    float* taps[2][2];
    for (int s = 0; s < 2; ++s)
      for (int t = 0; t < 2; ++t)
        taps[s][t] = w + (((2 * s + uv / 2) * 4 + 2 * t + uv % 2) * C + c) * O;
    float* transformed[kN][kN];
    for (int i = 0; i < kN; ++i)
      for (int j = 0; j < kN; ++j) transformed[i][j] = u + ((i * kN + j) * K + k) * O;
    if (back) {
      for (int s = 0; s < 2; ++s)
        for (int t = 0; t < 2; ++t) std::fill(taps[s][t], taps[s][t] + O, 0.f);
    } else {
      for (int i = 0; i < kN; ++i)
        for (int j = 0; j < kN; ++j) std::fill(transformed[i][j], transformed[i][j] + O, 0.f);
    }
    for (int i = 0; i < kN; ++i)
      for (int j = 0; j < kN; ++j)
        for (int s = 0; s < 2; ++s)
          for (int t = 0; t < 2; ++t) {
            const float coef = kG[i][s] * kG[j][t];
            if (coef == 0) continue;
            float* out = back ? taps[s][t] : transformed[i][j];
            const float* in = back ? transformed[i][j] : taps[s][t];
            for (int64_t o = 0; o < O; ++o) out[o] += coef * in[o];
          }
  }
}

// U for the kernel w, kept for the last 16 kernels and found again by value: within a step a
// layer's kernel goes into up to six passes, and its transform costs more than a small layer's
// products (it writes 25 / 16 times the kernel). U, in [25][4][C][O] order, is fixed by w's
// numbers in order, whatever C and O.
const float* TransformedKernel(const Geometry& g, const float* w) {
  struct Entry {
    std::vector<float> kernel, transformed;
    uint64_t used = 0;
  };
  constexpr size_t kEntries = 16;
  constexpr size_t kFloats = size_t{1} << 28;  // 1 GiB in all, however wide the layers
  static std::vector<Entry> cache;
  static uint64_t clock = 0;
  const int64_t size = 16 * g.c * g.o;
  for (Entry& entry : cache) {
    if (static_cast<int64_t>(entry.kernel.size()) == size &&
        std::equal(entry.kernel.begin(), entry.kernel.end(), w)) {
      entry.used = ++clock;
      return entry.transformed.data();
    }
  }
  // A new kernel takes the least recently used entry's place, and its memory (each step brings
  // new kernels: fresh memory would be page-faulted in each time); then, should the cache hold
  // over kFloats, other entries are emptied until it does not.
  if (cache.size() < kEntries) cache.emplace_back();
  auto oldest_first = [](const Entry& a, const Entry& b) { return a.used < b.used; };
  Entry& entry = *std::min_element(cache.begin(), cache.end(), oldest_first);
  entry.kernel.assign(w, w + size);
  entry.transformed.resize(kNN * g.K() * g.o);
  entry.used = ++clock;
  KernelTransform(g, entry.kernel.data(), entry.transformed.data(), false);
  auto held = [](const Entry& e) { return e.kernel.capacity() + e.transformed.capacity(); };
  size_t kept = 0;
  for (const Entry& e : cache) kept += held(e);
  for (Entry& other : cache) {
    if (kept <= kFloats) break;
    if (&other == &entry) continue;
    kept -= held(other);
    other = Entry{};
  }
  return entry.transformed.data();
}

// The forward and data-gradient passes go in blocks of whole images, one block per thread at a
// time, so that the transformed tiles stay in the thread's cache between the three stages.
template <typename F>
void ForBlocks(const Geometry& g, F block) {
  const int64_t images = std::max<int64_t>(1, 32 / g.TilesPerImage());
  ForEach((g.n + images - 1) / images, [&](int64_t i, ThreadBuffers& b) {
    const int64_t first = i * images * g.TilesPerImage();
    block(first, std::min(g.n, (i + 1) * images) * g.TilesPerImage() - first, b);
  });
}

// Blocks pay for reading U once per block; whole passes, for writing and reading back the
// transformed tiles. Measured per layer of DCGAN: blocks win while U is small (C = 64).
bool Blocked(const Geometry& g) { return kNN * g.K() * g.o * sizeof(float) <= (4 << 20); }

void Forward(const Geometry& g, const float* x, const float* w, float* y) {
  const int64_t K = g.K(), O = g.o, T = g.Tiles();
  const float* u = TransformedKernel(g, w);
  if (Blocked(g)) {
    ForBlocks(g, [&](int64_t first, int64_t count, ThreadBuffers& b) {
      float* v = Scratch::Resized(b.transformed, kNN * count * K);
      float* m = Scratch::Resized(b.products, kNN * count * O);
      for (int64_t t = 0; t < count; ++t) InputTile(g, x, first + t, v + t * K, count, b.scratch);
      Multiply(GetProduct(kNN, count, K, O, false, false), v, u, m, b.scratchpad);
      for (int64_t t = 0; t < count; ++t) OutputTile(g, m + t * O, count, first + t, y, b.scratch);
    });
    return;
  }
  static std::vector<float> v, m;
  static std::vector<uint8_t> scratchpad;
  float* pv = Scratch::Resized(v, kNN * T * K);
  float* pm = Scratch::Resized(m, kNN * T * O);
  ForEach(T, [&](int64_t t, ThreadBuffers& b) { InputTile(g, x, t, pv + t * K, T, b.scratch); });
  Multiply(GetProduct(kNN, T, K, O, false, false), pv, u, pm, scratchpad);
  ForEach(T, [&](int64_t t, ThreadBuffers& b) { OutputTile(g, pm + t * O, T, t, y, b.scratch); });
}

void BackwardData(const Geometry& g, const float* dy, const float* w, float* dx) {
  const int64_t K = g.K(), O = g.o, T = g.Tiles();
  const float* u = TransformedKernel(g, w);
  if (Blocked(g)) {
    ForBlocks(g, [&](int64_t first, int64_t count, ThreadBuffers& b) {
      float* dm = Scratch::Resized(b.products, kNN * count * O);
      float* dv = Scratch::Resized(b.transformed, kNN * count * K);
      for (int64_t t = 0; t < count; ++t)
        OutputTileBack(g, dy, first + t, dm + t * O, count, b.scratch);
      Multiply(GetProduct(kNN, count, O, K, false, true), dm, u, dv, b.scratchpad);
      const int64_t image_size = g.h * g.w * g.c, image = first / g.TilesPerImage();
      std::fill(dx + image * image_size, dx + (image + count / g.TilesPerImage()) * image_size,
                0.f);
      for (int64_t t = 0; t < count; ++t)
        InputTileBack(g, dv + t * K, count, first + t, dx, b.scratch);
    });
    return;
  }
  static std::vector<float> dm, dv;
  static std::vector<uint8_t> scratchpad;
  float* pdm = Scratch::Resized(dm, kNN * T * O);
  float* pdv = Scratch::Resized(dv, kNN * T * K);
  ForEach(
      T, [&](int64_t t, ThreadBuffers& b) { OutputTileBack(g, dy, t, pdm + t * O, T, b.scratch); });
  Multiply(GetProduct(kNN, T, O, K, false, true), pdm, u, pdv, scratchpad);
  // Tiles overlap: each image's are added in order by one thread.
  const int64_t per_image = g.TilesPerImage(), image_size = g.h * g.w * g.c;
  ForEach(g.n, [&](int64_t image, ThreadBuffers& b) {
    std::fill(dx + image * image_size, dx + (image + 1) * image_size, 0.f);
    for (int64_t t = image * per_image; t < (image + 1) * per_image; ++t)
      InputTileBack(g, pdv + t * K, T, t, dx, b.scratch);
  });
}

// The kernel gradient sums over all tiles: one product with the tiles as the inner dimension.
void BackwardWeights(const Geometry& g, const float* x, const float* dy, float* dw) {
  const int64_t K = g.K(), O = g.o, T = g.Tiles();
  static std::vector<float> v, dm, du;
  float* pv = Scratch::Resized(v, kNN * T * K);
  float* pdm = Scratch::Resized(dm, kNN * T * O);
  float* pdu = Scratch::Resized(du, kNN * K * O);
  ForEach(T, [&](int64_t t, ThreadBuffers& b) {
    InputTile(g, x, t, pv + t * K, T, b.scratch);
    OutputTileBack(g, dy, t, pdm + t * O, T, b.scratch);
  });
  static std::vector<uint8_t> scratchpad;
  Multiply(GetProduct(kNN, K, T, O, true, false), pv, pdm, pdu, scratchpad);
  KernelTransform(g, dw, pdu, true);
}

}  // namespace winograd

// Passes as matrix products of the 4 x 4 x C windows of the large side (im2col). With the kernel as
// a [16 C, O] matrix W (HWIO's rows are (kh, kw, c)) and row (n, i, j) of P the window of x under
// output pixel (n, i, j): y = P W, dP = dy W^T and dW = P^T dy. Products accumulate in float32, as
// oneDNN's direct passes do.
//
// The data gradient of the RGB layers (under 16 channels on the large side: G's last layer, whose
// forward pass it is, and D's first): oneDNN's direct pass ran these thin layers at 30-60 GFLOP/s
// here, against 240-480 for the middle layers. dP's windows are added back in place (col2im), in
// float32. (Their forward and kernel-gradient passes this way measured no faster than oneDNN's.)
//
// The bfloat16 kernel gradient of the widest layer (8 x 8 x 256 -> 4 x 4 x 512 in DCGAN): oneDNN
// 3.2 has no brgemm kernel-gradient convolution for bf16 without AMX, and its older one ran it at
// 16-18 ms per call here against 11.7 for P^T dy over the whole batch (P: 8 MiB), which comes out
// in HWIO as it is. At 16 x 16 x 128 the two were within 1 ms, at 32 x 32 x 64 the product slower.
namespace patches {

// x [n, h, w, c] -> y [n, h/2, w/2, o]; images go in blocks of kImages per product.
struct Geometry {
  int64_t n, h, w, c, o;

  static constexpr int64_t kImages = 4;
  int64_t Pixels() const { return h / 2 * (w / 2); }  // rows of dP per image
  int64_t Columns() const { return 16 * c; }
  int64_t Blocks() const { return (n + kImages - 1) / kImages; }
};

// bfloat16 is stored as the high half of a float32 (rounded to nearest even).
uint16_t ToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// dx for `images` images from `first`: each row of dP added over its window, in float32 (`sum`,
// one image), then stored in dx's type. Along a row of the kernel the four taps lie side by side,
// in dP's row and in the image: 4 C numbers at once, but at the image's edges.
template <typename T>
void Scatter(const Geometry& g, const float* dp, int64_t first, int64_t images, T* dx,
             std::vector<float>& sum) {
  const int64_t oh = g.h / 2, ow = g.w / 2, c = g.c, size = g.h * g.w * c;
  float* image_sum = Scratch::Resized(sum, size);
  for (int64_t image = first; image < first + images; ++image) {
    std::fill(image_sum, image_sum + size, 0.f);
    for (int64_t i = 0; i < oh; ++i)
      for (int64_t j = 0; j < ow; ++j, dp += g.Columns())
        for (int kh = 0; kh < 4; ++kh) {
          const int64_t row = 2 * i + kh - 1;
          if (row < 0 || row >= g.h) continue;
          // Column 2j - 1 onwards; the taps off the image's edges are skipped.
          const int64_t out = (row * g.w + 2 * j - 1) * c;
          const float* in = dp + kh * 4 * c;
          const int64_t begin = j == 0 ? c : 0, end = j == ow - 1 ? 3 * c : 4 * c;
          for (int64_t k = begin; k < end; ++k) image_sum[out + k] += in[k];
        }
    T* out = dx + image * size;
    for (int64_t k = 0; k < size; ++k) {
      if constexpr (std::is_same_v<T, float>) {
        out[k] = image_sum[k];
      } else {
        out[k] = ToBf16(image_sum[k]);
      }
    }
  }
}

// dx from dy, with the float32 kernel w (converted for bfloat16 compute: T is float or uint16_t).
template <typename T>
void BackwardData(const Geometry& g, const T* dy, const float* w, T* dx) {
  const memory::data_type data =
      std::is_same_v<T, float> ? memory::data_type::f32 : memory::data_type::bf16;
  const void* kernel = w;
  static std::vector<uint16_t> bf16;
  if constexpr (!std::is_same_v<T, float>) {
    bf16.resize(g.Columns() * g.o);
    for (size_t k = 0; k < bf16.size(); ++k) bf16[k] = ToBf16(w[k]);
    kernel = bf16.data();
  }
  ForEach(g.Blocks(), [&](int64_t block, ThreadBuffers& b) {
    const int64_t first = block * Geometry::kImages;
    const int64_t images = std::min(Geometry::kImages, g.n - first);
    float* dp = Scratch::Resized(b.products, images * g.Pixels() * g.Columns());
    const Product& product = GetProduct(1, images * g.Pixels(), g.o, g.Columns(), false, true, data,
                                        memory::data_type::f32);
    Multiply(product, dy + first * g.Pixels() * g.o, kernel, dp, b.scratchpad);
    Scatter(g, dp, first, images, dx, b.scratch.z);
  });
}

// P [n h/2 w/2, 16 c] from bfloat16 x: each row the window of x under one output pixel, zero off
// the image's edges.
void Gather(const Geometry& g, const uint16_t* x, uint16_t* p) {
  const int64_t oh = g.h / 2, ow = g.w / 2, c = g.c;
  ForEach(g.n, [&](int64_t image, ThreadBuffers&) {
    uint16_t* window = p + image * g.Pixels() * g.Columns();
    for (int64_t i = 0; i < oh; ++i)
      for (int64_t j = 0; j < ow; ++j, window += g.Columns())
        for (int kh = 0; kh < 4; ++kh)
          for (int kw = 0; kw < 4; ++kw) {
            const int64_t row = 2 * i + kh - 1, col = 2 * j + kw - 1;
            uint16_t* out = window + (kh * 4 + kw) * c;
            if (row < 0 || row >= g.h || col < 0 || col >= g.w) {
              std::fill(out, out + c, uint16_t{0});
            } else {
              const uint16_t* in = x + ((image * g.h + row) * g.w + col) * c;
              std::copy(in, in + c, out);
            }
          }
  });
}

// dw [16 c, o] (HWIO, float32) = P^T dy: one product over the whole batch, on every core. P and
// the scratchpad are kept between calls (which run one at a time).
void BackwardWeights(const Geometry& g, const uint16_t* x, const uint16_t* dy, float* dw) {
  static std::vector<uint16_t> p;
  static std::vector<uint8_t> scratchpad;
  const int64_t rows = g.n * g.Pixels();
  Gather(g, x, Scratch::Resized(p, rows * g.Columns()));
  Multiply(GetProduct(1, g.Columns(), rows, g.o, true, false, memory::data_type::bf16,
                      memory::data_type::f32),
           p.data(), dy, dw, scratchpad);
}

}  // namespace patches

// Runs `task` on the worker and waits; its exceptions (oneDNN's errors) become the FFI's.
ffi::Error OnWorker(const std::function<void()>& task) {
  std::string failure;
  Worker::Get().Run([&] {
    try {
      task();
    } catch (const std::exception& error) {
      failure = error.what();
    }
  });
  if (failure.empty()) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN: " + failure);
}

// Runs `op` for `shape` with `args` (activations) and the kernel at `user_kernel` in the caller's
// layout: reordered in before a forward or data-gradient pass, out after a kernel-gradient pass.
// The scratchpad and the kernel's buffer are kept and reused (calls run one at a time): fresh ones
// would be zeroed and page-faulted in on every call.
ffi::Error Execute(Op op, const Shape& shape, std::unordered_map<int, memory> args,
                   void* user_kernel) {
  return OnWorker([&] {
    const Plan& plan = GetPlan(op, shape);
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
  });
}

// The forms a call may take besides oneDNN's direct passes, as the bits of its `forms` attribute:
// the package passes both; its tests pass fewer, to compare with the direct passes.
constexpr int32_t kWinograd = 1;
constexpr int32_t kPatches = 2;

// Winograd's form runs float32 layers whose tiles fit, with at least 16 input channels (the
// RGB layers run faster direct).
bool UseWinograd(int32_t forms, ffi::DataType data, ffi::DataType weights,
                 ffi::Span<const int64_t> src) {
  return (forms & kWinograd) && data == ffi::DataType::F32 && weights == ffi::DataType::F32 &&
         winograd::Geometry::Fits(src[1], src[2]) && src[3] >= 16;
}

// `patches` runs two passes, with a float32 kernel: the data gradient of layers with under 16
// channels on the large side (the RGB layers), and the bfloat16 kernel gradient of layers with at
// least 16 channels and at most 64 pixels on that side (DCGAN's widest, 8 x 8 x 256 -> 4 x 4 x 512,
// where it measured 1.6x faster; at 16 x 16 and 32 x 32 it was not).
bool UsePatches(int32_t forms, Op op, ffi::Span<const int64_t> src, ffi::DataType data,
                ffi::DataType weights) {
  if (!(forms & kPatches) || weights != ffi::DataType::F32) return false;
  if (op == Op::kBackwardData) return src[3] < 16;
  return op == Op::kBackwardWeights && data == ffi::DataType::BF16 && src[3] >= 16 &&
         src[1] * src[2] <= 64;
}

winograd::Geometry GeometryOf(ffi::Span<const int64_t> src, ffi::Span<const int64_t> dst) {
  return winograd::Geometry{src[0], src[1], src[2], src[3], dst[3]};
}

Shape ShapeOf(ffi::Span<const int64_t> src, ffi::Span<const int64_t> dst, ffi::DataType data,
              ffi::DataType weights) {
  return Shape{src[0], src[1],           src[2],
               src[3], dst[1],           dst[2],
               dst[3], OneDnnType(data), OneDnnType(weights)};
}

// Runs `op` on the arrays of one call: `large` the convolution's input side (x, or its gradient),
// `small` its output side (y, or its gradient), `kernel` the kernel or its gradient; `forms` the
// forms it may take (kWinograd, kPatches).
ffi::Error Run(Op op, const ffi::AnyBuffer& large, const ffi::AnyBuffer& small,
               const ffi::AnyBuffer& kernel, int32_t forms) {
  void *x = large.untyped_data(), *y = small.untyped_data(), *w = kernel.untyped_data();
  if (UseWinograd(forms, large.element_type(), kernel.element_type(), large.dimensions())) {
    winograd::Geometry g = GeometryOf(large.dimensions(), small.dimensions());
    auto f32 = [](void* data) { return static_cast<float*>(data); };
    return OnWorker([&] {
      if (op == Op::kForward) winograd::Forward(g, f32(x), f32(w), f32(y));
      if (op == Op::kBackwardData) winograd::BackwardData(g, f32(y), f32(w), f32(x));
      if (op == Op::kBackwardWeights) winograd::BackwardWeights(g, f32(x), f32(y), f32(w));
    });
  }
  Shape shape =
      ShapeOf(large.dimensions(), small.dimensions(), large.element_type(), kernel.element_type());
  if (UsePatches(forms, op, large.dimensions(), large.element_type(), kernel.element_type())) {
    ffi::Span<const int64_t> src = large.dimensions();
    patches::Geometry g{src[0], src[1], src[2], src[3], small.dimensions()[3]};
    return OnWorker([&] {
      if (op == Op::kBackwardWeights) {
        patches::BackwardWeights(g, static_cast<uint16_t*>(x), static_cast<uint16_t*>(y),
                                 static_cast<float*>(w));
      } else if (shape.data == memory::data_type::f32) {
        patches::BackwardData(g, static_cast<float*>(y), static_cast<float*>(w),
                              static_cast<float*>(x));
      } else {
        patches::BackwardData(g, static_cast<uint16_t*>(y), static_cast<float*>(w),
                              static_cast<uint16_t*>(x));
      }
    });
  }
  memory large_side = Wrap(shape.Src(), x), small_side = Wrap(shape.Dst(), y);
  std::unordered_map<int, memory> args;
  if (op == Op::kForward) args = {{DNNL_ARG_SRC, large_side}, {DNNL_ARG_DST, small_side}};
  if (op == Op::kBackwardData) {
    args = {{DNNL_ARG_DIFF_SRC, large_side}, {DNNL_ARG_DIFF_DST, small_side}};
  }
  if (op == Op::kBackwardWeights) {
    args = {{DNNL_ARG_SRC, large_side}, {DNNL_ARG_DIFF_DST, small_side}};
  }
  return Execute(op, shape, std::move(args), w);
}

ffi::Error Forward(ffi::AnyBuffer src, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> dst,
                   int32_t forms) {
  return Run(Op::kForward, src, *dst, kernel, forms);
}

ffi::Error BackwardData(ffi::AnyBuffer diff_dst, ffi::AnyBuffer kernel,
                        ffi::Result<ffi::AnyBuffer> diff_src, int32_t forms) {
  return Run(Op::kBackwardData, *diff_src, diff_dst, kernel, forms);
}

ffi::Error BackwardWeights(ffi::AnyBuffer src, ffi::AnyBuffer diff_dst,
                           ffi::Result<ffi::AnyBuffer> diff_kernel, int32_t forms) {
  return Run(Op::kBackwardWeights, src, diff_dst, *diff_kernel, forms);
}

}  // namespace

// Each takes two arrays and returns one: (x, kernel) -> y; (dy, kernel) -> dx; (x, dy) -> dkernel;
// and the int32 attribute `forms`.
XLA_FFI_DEFINE_HANDLER_SYMBOL(GanConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("forms"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GanConvBackwardData, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("forms"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GanConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("forms"));

// Whether this CPU has oneDNN's bfloat16 convolutions and matrix products: oneDNN 3.2 implements
// them with AVX-512 only, and with AVX2 alone creates no bfloat16 primitive at all.
extern "C" int GanSupportsBf16() {
  try {
    Shape{1, 8, 8, 16, 4, 4, 16, memory::data_type::bf16, memory::data_type::f32}.Forward();
    memory::desc a = Batched(1, 16, 16, false, memory::data_type::bf16);
    memory::desc c = Batched(1, 16, 16, false, memory::data_type::f32);
    dnnl::matmul::primitive_desc(Engine(), a, a, c, UserScratchpad());
    return 1;
  } catch (const dnnl::error&) {
    return 0;
  }
}
