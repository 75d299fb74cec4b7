// decode_layers: the decode step of a stack of transformer blocks in one parallel region. Each block runs the
// pieces (cpu/work.h) its ops' own entries run, on the same values, so the result is the Python blocks' bit for bit
// (tests compare the two). What goes is the work around them: run op by op, a block costs about ten dispatcher
// calls, allocations and OpenMP regions, and one thread idles while another does the small ops; here the threads
// enter one region for the whole step and wait for each other only where a piece needs another's output, ten
// barriers a block.
//
// Per block, threads sharing each phase's items (output rows of a matrix, (token, KV head) items of attention,
// tokens elsewhere; a token for each decoding row of the caches):
//   wqkv | rope, K/V into the ring | attention | wo's input | wo | norm, w13's input | w13 | silu, w2's input | w2 |
//   norm, the next block's wqkv input
// where a matrix's input is its activations rounded to int8 (a quantized part) or widened to fp32 (a dense part
// that needs it: dense_linear_needs_input).
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <omp.h>

#include <array>
#include <atomic>
#include <memory>
#include <thread>

#include "op_checks.h"
#include "cpu/work.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {
namespace {

// The dtypes a dense part may be stored in, as indices of the inputs prepared for them.
enum class Stored { f32, bf16, f16 };
constexpr int kStored = 3;

Stored stored_as(at::ScalarType t) {
  return t == at::kFloat ? Stored::f32 : t == at::kBFloat16 ? Stored::bf16 : Stored::f16;
}

template <typename Fn>
void with_stored(Stored s, Fn&& fn) {
  switch (s) {
    case Stored::f32: return fn(float{});
    case Stored::bf16: return fn(c10::BFloat16{});
    case Stored::f16: return fn(c10::Half{});
  }
}

// The threads' meeting point between phases. libgomp's own barrier sleeps on a futex instead of spinning once it
// manages more threads than there are cores, as it does when a second Python thread runs torch ops: then each of a
// step's 300 barriers costs a wake-up, and the default model's step from that thread took 9.4-10.4 ms against
// 4.1-5.5 ms from the first (measured; this one: the same from both). It spins, and yields its core after a while,
// so that more threads than cores still make progress.
class Barrier {
 public:
  explicit Barrier(int64_t threads) : threads_(threads) {}

  void set_threads(int64_t threads) { threads_ = threads; }

  void wait() {
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);  // publishes every thread's writes before the barrier
      return;
    }
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < kSpins) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int64_t kSpins = 1 << 14;  // some tens of microseconds: longer than any phase of a small model
  alignas(64) std::atomic<int64_t> arrived_{0};
  alignas(64) std::atomic<int64_t> generation_{0};
  int64_t threads_;
};

// One row block of a matrix: quantized (quant.qweight set) or dense, whose output columns start at `offset`.
struct Part {
  QuantMatrix quant;
  const void* dense;
  Stored stored;
  int64_t n, offset;
};

// A matrix and the input it multiplies: the activations as the block computed them, rounded to int8 for the
// quantized parts, widened to fp32 for the dense parts that need it (per stored dtype).
template <typename T>
struct Matrix {
  std::vector<Part> parts;
  int64_t n = 0, k = 0;
  QuantActivations* quantized = nullptr;              // set when a part is quantized
  std::array<std::vector<float>*, kStored> widened{};  // set for the stored dtypes whose parts need it

  // Rows [begin, end) of x [B, k] made into this matrix's input.
  void prepare(const T* x, int64_t begin, int64_t end) const {
    if (quantized) quantize_activation_blocks(x, *quantized, begin * (k / kQuantBlock), end * (k / kQuantBlock));
    for (int s = 0; s < kStored; ++s)
      if (widened[s])
        with_stored(static_cast<Stored>(s), [&](auto w) {
          dense_linear_input<decltype(w)>(x, k, widened[s]->data(), begin, end);
        });
  }

  // This thread's share of y [B, n] = x @ W.T for x as prepare() left it (x itself where no part widens it).
  void multiply(const T* x, T* y, int64_t batch, int64_t tid, int64_t threads) const {
    for (const Part& p : parts) {
      if (p.quant.qweight) {
        const auto [begin, end] = share(p.quant.groups(), tid, threads);
        quant_linear_groups(p.quant, *quantized, y + p.offset, n, begin, end);
        continue;
      }
      with_stored(p.stored, [&](auto stored) {
        using W = decltype(stored);
        const std::vector<float>* input = widened[static_cast<int>(p.stored)];
        const float* xf = input ? input->data() : reinterpret_cast<const float*>(x);  // else T is float
        const auto [begin, end] = share(dense_linear_tiles(p.n), tid, threads);
        dense_linear_tiles(xf, static_cast<const W*>(p.dense), y + p.offset, n, batch, p.n, k, begin, end);
      });
    }
  }
};

template <typename T>
struct Layer {
  const T* ffn_norm;
  const T* next_norm;
  T* k_cache;
  T* v_cache;
  int64_t hidden;
  Matrix<T> wqkv, wo, w13, w2;
};

// Activations and buffers of one step, allocated before the region: in it only a quantized matrix whose rows are
// not whole groups of 8 allocates (its padded last group), and nothing throws.
template <typename T>
struct Step {
  int64_t batch, dim, hq, hkv, head_dim, slots;  // batch: the tokens, one for each of some cache rows
  double eps;
  const int64_t* rows;
  const int64_t* positions;
  const int64_t* cache_rows;
  std::vector<float> cos, sin;  // [B, D/2] each: the positions' rotations, the same for every layer
  std::vector<Layer<T>> layers;
  const T* x;
  const T* residual;
  T* out;     // [B, dim]: the stream normed, each block's input, and the result
  T* stream;  // [B, dim]: the residual stream
  std::vector<T> qkv, q, attended, h, gate_up, gated;
  // The matrices' inputs, one set per K: the matrices that share one (wqkv and w13 at least) prepare and read it
  // in turn, a barrier between each read and the next preparation.
  struct Inputs {
    int64_t k;
    QuantActivations quantized;
    std::array<std::vector<float>, kStored> widened;
  };
  std::vector<std::unique_ptr<Inputs>> inputs;

  Inputs& inputs_for(int64_t k) {
    for (auto& i : inputs)
      if (i->k == k) return *i;
    inputs.push_back(std::make_unique<Inputs>());
    inputs.back()->k = k;
    return *inputs.back();
  }
  DecodeAttention<T> attention;
  std::vector<std::vector<float>> scratch;  // attention's, per thread
};

// Reads the matrices of decode_layers' `weights` (checked) into parts and gives each its input buffers.
template <typename T>
Matrix<T> read_matrix(Step<T>& step, const c10::List<std::optional<at::Tensor>>& weights, int64_t& entry,
                      int64_t parts, int64_t k) {
  Matrix<T> m;
  m.k = k;
  auto& inputs = step.inputs_for(k);
  for (int64_t p = 0; p < parts; ++p, entry += 3) {
    const at::Tensor w = weights.get(entry).value();
    const std::optional<at::Tensor> scales = weights.get(entry + 1), mins = weights.get(entry + 2);
    Part part{{}, nullptr, Stored::f32, w.size(0), m.n};
    if (scales) {
      part.quant = {w.const_data_ptr(), w.scalar_type() == at::kChar, scales->const_data_ptr<at::Half>(),
                    mins ? mins->const_data_ptr<at::Half>() : nullptr, w.size(0), k};
      m.quantized = &inputs.quantized;
      if (inputs.quantized.q.empty()) inputs.quantized.resize(step.batch, k);
    } else {
      part.dense = w.const_data_ptr();
      part.stored = stored_as(w.scalar_type());
      bool needs = false;
      with_stored(part.stored, [&](auto stored) { needs = dense_linear_needs_input<decltype(stored), T>(); });
      std::vector<float>& widened = inputs.widened[static_cast<int>(part.stored)];
      if (needs) {
        widened.resize(step.batch * k);
        m.widened[static_cast<int>(part.stored)] = &widened;
      }
    }
    m.n += part.n;
    m.parts.push_back(part);
  }
  return m;
}

template <typename T>
void run_layer(Step<T>& s, const Layer<T>& layer, const Layer<T>* next, bool first, int64_t tid,
               int64_t threads, Barrier& barrier) {
  const int64_t batch = s.batch, dim = s.dim, d = s.head_dim, hq = s.hq, hkv = s.hkv, half = d / 2;
  const int64_t qkv_n = (hq + 2 * hkv) * d, hidden = layer.hidden;
  const auto [b0, b1] = share(batch, tid, threads);
  const T* x = first ? s.x : s.out;
  T* qkv = s.qkv.data();
  T* q = s.q.data();
  T* attended = s.attended.data();
  T* h = s.h.data();
  T* gate_up = s.gate_up.data();
  T* gated = s.gated.data();

  if (first) {
    layer.wqkv.prepare(x, b0, b1);
    barrier.wait();
  }
  layer.wqkv.multiply(x, qkv, batch, tid, threads);
  barrier.wait();
  for (int64_t b = b0; b < b1; ++b) {  // rope_cache_write
    const T* row = qkv + b * qkv_n;
    const float* c = s.cos.data() + b * half;
    const float* sn = s.sin.data() + b * half;
    rope_rotate(row, q + b * hq * d, hq, d, c, sn);
    const int64_t ring_row = s.cache_rows[b];
    if (ring_row < 0) continue;
    rope_rotate(row + hq * d, layer.k_cache + ring_row * hkv * d, hkv, d, c, sn);
    std::copy(row + (hq + hkv) * d, row + qkv_n, layer.v_cache + ring_row * hkv * d);
  }
  barrier.wait();
  DecodeAttention<T> attention = s.attention;
  attention.k_cache = layer.k_cache;
  attention.v_cache = layer.v_cache;
  const auto [i0, i1] = share(attention.items(), tid, threads);
  attention.run(i0, i1, s.scratch[tid]);
  barrier.wait();
  layer.wo.prepare(attended, b0, b1);
  barrier.wait();
  layer.wo.multiply(attended, h, batch, tid, threads);
  barrier.wait();
  rms_norm_rows(h, first ? s.residual : s.stream, layer.ffn_norm, s.eps, dim, s.out, s.stream, b0, b1);
  layer.w13.prepare(s.out, b0, b1);
  barrier.wait();
  layer.w13.multiply(s.out, gate_up, batch, tid, threads);
  barrier.wait();
  for (int64_t b = b0; b < b1; ++b) silu_mul_span(gate_up + b * 2 * hidden, hidden, gated + b * hidden, 0, hidden);
  layer.w2.prepare(gated, b0, b1);
  barrier.wait();
  layer.w2.multiply(gated, h, batch, tid, threads);
  barrier.wait();
  rms_norm_rows(h, s.stream, layer.next_norm, s.eps, dim, s.out, s.stream, b0, b1);
  if (next) next->wqkv.prepare(s.out, b0, b1);
  barrier.wait();
}

// The region, in a function of its own: with GCC 12, a parallel region inside the dispatch's lambda gave each thread
// its own copy of the Step declared in that lambda (seen), where the threads must share it.
template <typename T>
void run_step(Step<T>& s, int64_t threads) {
  const int64_t layers = static_cast<int64_t>(s.layers.size());
  Barrier barrier(threads);
#pragma omp parallel num_threads(threads)
  {
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
#pragma omp single
    barrier.set_threads(team);  // the team OpenMP gave, which may be smaller than asked
    for (int64_t l = 0; l < layers; ++l)
      run_layer(s, s.layers[l], l + 1 < layers ? &s.layers[l + 1] : nullptr, l == 0, tid, team, barrier);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_layers_cpu(
    const at::Tensor& x, const at::Tensor& residual, at::TensorList norms, double eps,
    const c10::List<std::optional<at::Tensor>>& weights, at::IntArrayRef parts, at::TensorList k_caches,
    at::TensorList v_caches, const at::Tensor& rows, const at::Tensor& positions, const at::Tensor& cache_rows,
    int64_t n_heads, double theta, std::optional<int64_t> window) {
  const DecodeLayersShape shape = check_decode_layers_args(x, residual, norms, eps, weights, parts, k_caches, v_caches,
                                                           rows, positions, cache_rows, n_heads, theta, window);
  at::Tensor out = at::empty_like(x), stream = at::empty_like(x);
  if (shape.batch == 0) return {out, stream};
  at::internal::lazy_init_num_threads();  // as at::parallel_for does: this thread's OpenMP team size set
  const int64_t threads = at::get_num_threads();
  MISTRAL_EXT_DISPATCH_FLOATS(x.scalar_type(), "decode_layers_cpu", [&] {
    using T = scalar_t;
    Step<T> s;
    s.batch = shape.batch;
    s.dim = shape.dim;
    s.hq = shape.hq;
    s.hkv = shape.hkv;
    s.head_dim = shape.head_dim;
    s.slots = shape.slots;
    s.eps = eps;
    s.rows = shape.rows.const_data_ptr<int64_t>();
    s.positions = shape.positions.const_data_ptr<int64_t>();
    s.cache_rows = cache_rows.const_data_ptr<int64_t>();
    const int64_t half = s.head_dim / 2;
    s.cos.resize(s.batch * half);
    s.sin.resize(s.batch * half);
    const std::vector<double> inv_freq = rope_inverse_frequencies(theta, s.head_dim);
    for (int64_t b = 0; b < s.batch; ++b)
      rope_cos_sin(s.positions[b], inv_freq, s.cos.data() + b * half, s.sin.data() + b * half);

    int64_t entry = 0, max_hidden = 0;
    for (int64_t l = 0; l < shape.layers; ++l) {
      Layer<T> layer;
      layer.ffn_norm = norms[2 * l].const_data_ptr<T>();
      layer.next_norm = norms[2 * l + 1].const_data_ptr<T>();
      layer.k_cache = k_caches[l].mutable_data_ptr<T>();
      layer.v_cache = v_caches[l].mutable_data_ptr<T>();
      layer.hidden = shape.hidden[l];
      max_hidden = std::max(max_hidden, layer.hidden);
      const int64_t* p = parts.data() + l * kDecodeMatrices;
      layer.wqkv = read_matrix(s, weights, entry, p[0], s.dim);
      layer.wo = read_matrix(s, weights, entry, p[1], s.hq * s.head_dim);
      layer.w13 = read_matrix(s, weights, entry, p[2], s.dim);
      layer.w2 = read_matrix(s, weights, entry, p[3], layer.hidden);
      s.layers.push_back(std::move(layer));
    }
    s.x = x.const_data_ptr<T>();
    s.residual = residual.const_data_ptr<T>();
    s.out = out.mutable_data_ptr<T>();
    s.stream = stream.mutable_data_ptr<T>();
    s.qkv.resize(s.batch * (s.hq + 2 * s.hkv) * s.head_dim);
    s.q.resize(s.batch * s.hq * s.head_dim);
    s.attended.resize(s.batch * s.hq * s.head_dim);
    s.h.resize(s.batch * s.dim);
    s.gate_up.resize(s.batch * 2 * max_hidden);
    s.gated.resize(s.batch * max_hidden);
    const int64_t heads = decode_heads_per_item(s.batch * s.hkv, s.hq / s.hkv, threads);
    s.attention = {s.q.data(), nullptr, nullptr, s.positions, s.rows, s.attended.data(), s.batch, s.slots, s.hq,
                   s.hkv, s.head_dim, heads, window};
    s.scratch.resize(threads);
    for (auto& scratch : s.scratch) scratch.reserve(s.attention.scratch());

    run_step(s, threads);
  });
  return {out, stream};
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
