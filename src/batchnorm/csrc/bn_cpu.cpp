// Batch normalization on CPU in C++: the training forward (Algorithm 1), its backward (Section 3),
// the inference forward (Algorithm 2), each with an optional fused activation, behind one op,
// batchnorm::batch_norm (registered with TORCH_LIBRARY at the end of this file, its autograd node
// TrainFn just above it).
//
// Why these kernels are faster than torch.nn's on CPU:
//   * memory passes: the training forward reads x once for the statistics and once more to write
//     y; the backward reads (dy, x) once for the per-channel sums Σdy and Σdy·(x − μ) and once more
//     to write dx: eight passes over an activation in all (docs/performance.md). With channels
//     enough, both go one channel at a time, so each second read comes from cache (sweeps());
//   * the parallel loops run on PyTorch's own OpenMP pool (at::parallel_for);
//   * one call does the whole training step: statistics, normalization (+ activation), the
//     running-statistics update and the autograd node. On a (60, 100) batch that per-call
//     overhead is most of the cost;
//   * bfloat16 is read and written directly (float32 arithmetic), with no conversion passes.
//
// Built by ops/native.py with torch.utils.cpp_extension on first use, cached on disk.
//
// Numerics:
//   * statistics per block (≤ 4096 values of one plane, or ≤ 256 rows) from sums of d = x − x_first
//     (exact for clustered data, so Σd² − (Σd)²/n cancels at most the block's own offset, never
//     μ²), merged in float64 with Chan et al.'s formula: M2 = Σ M2_b + Σ n_b (μ_b − μ)²;
//   * μ is applied as a pair μ_hi (the compute type) + μ_lo: y = (x − μ_hi)·a + (β − μ_lo·a),
//     a = γ / sqrt(σ²_B + ε), so x − μ_hi is exact for data far from zero;
//   * tensors under 2^16 values take one thread and float64 accumulators.
// Float reductions vectorize with `omp simd reduction`; nothing is compiled with -ffast-math, so
// NaN and inf propagate as in torch.
//
// Layouts: a contiguous (N, C, *S) tensor is viewed as planes (N, C, L); a channels_last one (and
// an (N, C) one) as rows (R, C) with the channels contiguous.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <new>
#include <type_traits>
#include <unistd.h>
#include <unordered_map>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Activation / saved-tensor codes: the same values as ops/op.py.
constexpr int ACT_NONE = 0, ACT_RELU = 1, ACT_LEAKY = 2;
// Smooth or bounded activations (act_value / act_slope, compiled per activation): slope carries
// ELU's alpha.
constexpr int ACT_RELU6 = 3, ACT_SILU = 4, ACT_HARDSWISH = 5, ACT_HARDSIGMOID = 6, ACT_GELU = 7,
              ACT_GELU_TANH = 8, ACT_ELU = 9, ACT_MISH = 10, ACT_SIGMOID = 11, ACT_TANH = 12;
constexpr int ACT_LAST = ACT_TANH;
// Backward reads x, x through a piecewise-linear act (ReLU, leaky ReLU, identity), y, or x
// through any other act (z recomputed, act'(z) from act_slope): the kernels' template MODE is
// then kGen + the activation's code.
constexpr int SAVED_X = 0, SAVED_X_ACT = 1, SAVED_Y = 2, SAVED_X_GEN = 3;
constexpr int kGen = 100;
constexpr int SAVE_AUTO = 0, SAVE_INPUT = 1, SAVE_OUTPUT = 2;

constexpr int64_t kBlock = 4096;           // planes: values per work item (16 KB float32, in L1)
constexpr int64_t kSubRows = 256;          // rows: rows per sub-block (≤ 256 float32 terms per sum)
constexpr int64_t kGrain = 32768;          // values per parallel task, at least
constexpr int64_t kSerialBelow = 1 << 16;  // fewer values: one thread, float64 accumulators
constexpr int64_t kSweepPlane = 256;       // shorter planes: two passes (see sweeps)

template <typename T> struct OpMath { using type = float; };   // float32, bfloat16: float32
template <> struct OpMath<double> { using type = double; };
template <typename T> using op_t = typename OpMath<T>::type;

// ------------------------------------------------------------------ geometry
// A contiguous (N, C, *S) tensor is N·C planes of L values; a channels_last one, or an (N, C) one,
// is R rows of C contiguous channels.
struct Geo {
  bool rows;
  int64_t outer;  // N (planes) or R (rows)
  int64_t C;
  int64_t L;      // values per plane (1 for rows)
  int64_t numel() const { return outer * C * L; }
};

Geo geometry(const Tensor& x) {
  const int64_t C = x.size(1), numel = x.numel();
  if (x.is_contiguous()) {
    const int64_t N = x.size(0), L = numel / (N * C);
    return {L == 1, N, C, L};
  }
  return {true, numel / C, C, 1};
}

at::MemoryFormat format_of(const Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  return x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

bool supported(const Tensor& x) {
  const auto dt = x.scalar_type();
  if (!x.defined() || !x.device().is_cpu() || x.layout() != at::kStrided) return false;
  if (dt != at::kFloat && dt != at::kDouble && dt != at::kBFloat16) return false;
  if (x.dim() < 2 || x.dim() > 5 || x.numel() == 0) return false;
  if (x.is_contiguous()) return true;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

int64_t row_chunks(int64_t R, int64_t C) {
  const int64_t most = std::min<int64_t>(R, 4 * at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(most, R * C / kGrain));
}

// ------------------------------------------------------------------ output-buffer cache
// Outputs of ≥ 1 MiB come from freed buffers of the same byte size: glibc serves such blocks with
// a fresh mmap that page-faults on first write: about 20 ms for a 51 MB activation on a 2-core
// machine, several times the kernels' own time (ops/buffers.py has the controls; torch has no CPU
// caching allocator).
// A buffer goes back to the cache from the deleter of the tensor storage that owned it, so it is
// never handed out while any view of the old tensor is alive. Outputs are ordinary tensors (their
// own storage, not views), so in-place ops, views and resize_ work on them as on torch.empty's.
constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kAlign = 64;

struct Cache {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> idle;
  size_t idle_bytes = 0;
  size_t limit = size_t(1024) << 20;
  int64_t hits = 0, misses = 0, dropped = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: deleters may run during interpreter exit
  return *c;
}

void give_back(void* p, size_t n) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.idle_bytes + n <= c.limit) {
      c.idle[n].push_back(p);
      c.idle_bytes += n;
      return;
    }
    ++c.dropped;
  }
  std::free(p);
}

struct Block {
  void* p;
  size_t n;
};

void release_block(void* ctx) {
  const Block* blk = static_cast<Block*>(ctx);
  give_back(blk->p, blk->n);
  delete blk;
}

Tensor empty_like_cached(const Tensor& x) {
  const size_t n = size_t(x.numel()) * x.element_size();
  Cache& c = cache();
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (n < kMinBytes || c.limit == 0) return at::empty_like(x);
    auto it = c.idle.find(n);
    if (it != c.idle.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      c.idle_bytes -= n;
      ++c.hits;
    } else {
      ++c.misses;
    }
  }
  if (p == nullptr) {
    p = std::aligned_alloc(kAlign, (n + kAlign - 1) / kAlign * kAlign);
    if (p == nullptr) throw std::bad_alloc();
  }
  // A resizable storage with torch's CPU allocator, as torch.empty's: y.resize_(bigger) moves the
  // data to a fresh allocation, and the old block comes back here through its deleter.
  c10::DataPtr data(p, new Block{p, n}, &release_block, c10::Device(c10::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), n, std::move(data), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  return at::empty({0}, x.options()).set_(storage, 0, x.sizes(), x.strides());
}

int64_t cache_set_limit(int64_t nbytes) {
  TORCH_CHECK_VALUE(nbytes >= 0, "cache limit must be >= 0 bytes, got ", nbytes);
  Cache& c = cache();
  std::vector<void*> drop;
  int64_t old;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    old = int64_t(c.limit);
    c.limit = size_t(nbytes);
    // Free the largest idle buffers until the idle bytes fit the new limit.
    while (c.idle_bytes > c.limit) {
      auto big = c.idle.end();
      for (auto it = c.idle.begin(); it != c.idle.end(); ++it)
        if (!it->second.empty() && (big == c.idle.end() || it->first > big->first)) big = it;
      drop.push_back(big->second.back());
      big->second.pop_back();
      c.idle_bytes -= big->first;
    }
  }
  for (void* p : drop) std::free(p);
  return old;
}

void cache_empty() {
  Cache& c = cache();
  std::vector<void*> drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    for (auto& kv : c.idle)
      for (void* p : kv.second) drop.push_back(p);
    c.idle.clear();
    c.idle_bytes = 0;
  }
  for (void* p : drop) std::free(p);
}

std::unordered_map<std::string, int64_t> cache_info() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  int64_t buffers = 0;
  for (auto& kv : c.idle) buffers += int64_t(kv.second.size());
  return {{"idle_bytes", int64_t(c.idle_bytes)}, {"idle_buffers", buffers},
          {"limit", int64_t(c.limit)}, {"hits", c.hits}, {"misses", c.misses},
          {"dropped", c.dropped}};
}

// ------------------------------------------------------------------ per-channel vectors
// γ, β, running statistics as float64 (C,) vectors; undefined → fill.
std::vector<double> as_f64(const Tensor& t, int64_t C, double fill) {
  std::vector<double> out(C, fill);
  if (!t.defined()) return out;
  const bool direct = t.device().is_cpu() && t.is_contiguous();  // read in place, no torch op
  if (direct && t.scalar_type() == at::kFloat) {
    const float* p = t.const_data_ptr<float>();
    std::copy(p, p + C, out.begin());
  } else if (direct && t.scalar_type() == at::kDouble) {
    const double* p = t.const_data_ptr<double>();
    std::copy(p, p + C, out.begin());
  } else {
    const Tensor v = t.detach().to(at::kCPU, at::kDouble).contiguous();
    const double* p = v.const_data_ptr<double>();
    std::copy(p, p + C, out.begin());
  }
  return out;
}

// y = (x − μ_hi)·a + bb: a = γ/sqrt(σ² + ε), bb = β − μ_lo·a with μ = μ_hi + μ_lo.
template <typename T>
struct Coeffs {
  T mhi, a, bb;
};

template <typename T>
Coeffs<T> coeffs(double mean, double var, double w, double b, double eps) {
  const double sc = w / std::sqrt(var + eps);
  const T hi = T(mean);
  return {hi, T(sc), T(b - (mean - double(hi)) * sc)};
}

// The coefficients of every channel, as vectors (the loops over rows read them per channel).
template <typename T>
struct Affine {
  std::vector<T> mhi, a, bb;
  Affine(const double* mean, const double* var, const std::vector<double>& w,
         const std::vector<double>& b, double eps, int64_t C)
      : mhi(C), a(C), bb(C) {
    for (int64_t c = 0; c < C; ++c) {
      const Coeffs<T> k = coeffs<T>(mean[c], var[c], w[c], b[c], eps);
      mhi[c] = k.mhi;
      a[c] = k.a;
      bb[c] = k.bb;
    }
  }
  Coeffs<T> operator[](int64_t c) const { return {mhi[c], a[c], bb[c]}; }
};

// ================================================================== statistics (Algorithm 1)
// Planes are cut into work items of at most kBlock values of ONE channel: a block of a long plane
// (L ≥ kBlock), or several whole short planes of the same channel (samples n0..n1). Items are
// numbered in memory order (sample group, then channel, then block), so parallel_for hands each
// thread the same half of the tensor as the pass after it (normalize, dx) and as a conv before it
// that splits over samples: that half is still in the thread's own caches. (Numbered
// channel-major, each thread read half its data from the other core.) The merge visits channel
// c's items in the channel-major order all the same. Sums run in kLanes independent lanes that
// are reduced once per item, not once per plane: a horizontal add per 100-value plane would cost
// more than the plane itself.
constexpr int kLanes = 16;

struct PlaneItems {
  // channels, block length, blocks per plane, planes per item, sample groups, items in all
  int64_t C, bs, nb, npp, ngroups, items;
  PlaneItems(const Geo& g) : C(g.C) {
    bs = std::min(kBlock, g.L);
    nb = (g.L + bs - 1) / bs;
    npp = nb == 1 ? std::max<int64_t>(1, kBlock / g.L) : 1;
    ngroups = (g.outer + npp - 1) / npp;
    items = ngroups * C * nb;
  }
  int64_t grain() const { return std::max<int64_t>(1, kGrain / (npp * bs)); }
  int64_t per_channel() const { return ngroups * nb; }
  int64_t channel(int64_t it) const { return (it / nb) % C; }
  // f(item) for each item of channel c, sample group by sample group: the merge order.
  template <typename F>
  void each_of_channel(int64_t c, F&& f) const {
    for (int64_t gi = 0; gi < ngroups; ++gi)
      for (int64_t b = 0; b < nb; ++b) f((gi * C + c) * nb + b);
  }
  // Item → channel c, samples [n0, n1), values [lo, hi) of each plane.
  void decode(int64_t it, const Geo& g, int64_t& c, int64_t& n0, int64_t& n1, int64_t& lo,
              int64_t& hi) const {
    const int64_t b = it % nb, q = it / nb, gi = q / C;
    c = q - gi * C;
    n0 = gi * npp;
    n1 = std::min(n0 + npp, g.outer);
    lo = b * bs;
    hi = std::min(lo + bs, g.L);
  }
};

// The training kernels over planes read each value twice: once for the channel's sums, once to
// write y (forward) or dx (backward). Pass by pass, the second read of a tensor larger than the
// caches comes from memory again. Channel by channel (a sweep), it finds the channel's N·L values
// still in this core's cache: memory sees each tensor once, three tensors' worth of traffic in
// backward instead of five, two in forward instead of three. A sweep runs the same items, sums
// and merges in the same order, so its numbers are the two-pass kernels' (bit for bit up to the
// compiler's choice of fused multiply-adds). It needs channels enough to share out between the
// threads, values enough to share at all (smaller tensors stay in cache and take one thread
// anyway; they also sum in float64, which the sweep, summing in the compute type, does not
// reproduce, so that bound must stay), planes long enough to stream (a channel of
// shorter planes is a scatter of cache lines), and a channel small enough that the backward's
// three tensors of it (dy, the saved tensor, dx) fit in this core's L2 together.
int64_t l2_bytes() {
  static const int64_t l2 = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE  // glibc
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (v > 0) return int64_t(v);
#endif
    return int64_t(1) << 20;  // unknown: 1 MiB
  }();
  return l2;
}

bool sweeps(const Geo& g, size_t elem) {
  return !g.rows && g.L >= kSweepPlane && g.numel() >= kSerialBelow &&
         g.C >= 4 * int64_t(at::get_num_threads()) &&
         3 * g.outer * g.L * int64_t(elem) <= l2_bytes();
}

int64_t sweep_grain(const Geo& g) { return std::max<int64_t>(1, kGrain / (g.outer * g.L)); }

template <typename acc_t>
inline acc_t lane_sum(const acc_t* v) {
  acc_t t = 0;
  for (int j = 0; j < kLanes; ++j) t += v[j];
  return t;
}

// An item of short planes reads one channel's planes, one every C·L values: a jump to another
// page per plane, which the hardware prefetcher does not follow. In a training step that data is
// cold (the saved tensor comes back from memory in backward), and each plane would wait for its
// own miss. So the items ask for their planes kAhead samples early: a hint, which changes no
// number. Planes of 1 KB and more stream by themselves.
constexpr int64_t kAhead = 8;
constexpr int64_t kPrefetchBelow = 1024;  // bytes of a plane

template <typename scalar_t>
inline void prefetch_plane(const scalar_t* p, int64_t len) {
#if defined(__GNUC__)
  const char* b = reinterpret_cast<const char*>(p);
  const char* e = reinterpret_cast<const char*>(p + len) - 1;
  for (; b < e; b += 64) __builtin_prefetch(b);
  __builtin_prefetch(e);  // the last line, where the plane does not start on one
#endif
}

// One work item's (mean, M2 = Σ(x − mean)², count).
struct Moments {
  double mean, m2, n;
};

template <typename scalar_t, typename acc_t>
Moments item_moments(const scalar_t* x, const Geo& g, const PlaneItems& pi, int64_t it) {
  const int64_t L = g.L, C = g.C;
  int64_t c, n0, n1, lo, hi;
  pi.decode(it, g, c, n0, n1, lo, hi);
  const int64_t len = hi - lo;
  // shift by a sample: d = x − sh is exact for clustered data
  const acc_t sh = acc_t(x[(n0 * C + c) * L + lo]);
  alignas(64) acc_t sv[kLanes] = {}, qv[kLanes] = {};
  acc_t st = 0, qt = 0;
  const bool ahead = int64_t(len * sizeof(scalar_t)) < kPrefetchBelow;
  for (int64_t n = n0; ahead && n < std::min(n1, n0 + kAhead); ++n)
    prefetch_plane(x + (n * C + c) * L + lo, len);
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* blk = x + (n * C + c) * L + lo;
    if (ahead && n + kAhead < n1) prefetch_plane(blk + kAhead * C * L, len);
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        const acc_t d = acc_t(blk[i + j]) - sh;
        sv[j] += d;
        qv[j] += d * d;
      }
    }
    for (; i < len; ++i) {  // the tail in scalars: a scalar store into a lane would stall
      const acc_t d = acc_t(blk[i]) - sh;  // the next plane's vector load of that lane
      st += d;
      qt += d * d;
    }
  }
  const acc_t s = lane_sum(sv) + st, q = lane_sum(qv) + qt;
  const double k = double((n1 - n0) * len), dm = double(s) / k;
  return {double(sh) + dm, std::max(double(q) - double(s) * dm, 0.0), k};  // M2 = Σ(d − mean d)²
}

// μ_B and σ²_B (biased) of one channel from its items' moments, in each_of_channel order.
inline void merge_moments(const Moments* m, int64_t count, double& mean, double& var) {
  double s = 0, tot = 0;
  for (int64_t i = 0; i < count; ++i) {
    s += m[i].mean * m[i].n;
    tot += m[i].n;
  }
  const double mu = s / tot;  // μ_B = 1/m Σ x_i
  double m2 = 0;
  for (int64_t i = 0; i < count; ++i) {
    const double d = m[i].mean - mu;
    m2 += m[i].m2 + m[i].n * d * d;  // Chan: Σ M2_b + Σ n_b (μ_b − μ)²
  }
  mean = mu;
  var = m2 / tot;  // σ²_B, biased
}

template <typename scalar_t, typename acc_t>
void planes_stats(const scalar_t* x, const Geo& g, double* mean, double* var) {
  const PlaneItems pi(g);
  std::vector<Moments> pm(pi.items);
  at::parallel_for(0, pi.items, pi.grain(), [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) pm[it] = item_moments<scalar_t, acc_t>(x, g, pi, it);
  });
  std::vector<Moments> mc(pi.per_channel());
  for (int64_t c = 0; c < g.C; ++c) {  // merge (a few thousand float64 adds: one thread)
    int64_t j = 0;
    pi.each_of_channel(c, [&](int64_t i) { mc[j++] = pm[i]; });
    merge_moments(mc.data(), j, mean[c], var[c]);
  }
}

template <typename scalar_t, typename acc_t>
void rows_stats(const scalar_t* x, const Geo& g, double* mean, double* var) {
  const int64_t R = g.outer, C = g.C, nchunk = row_chunks(R, C);
  std::vector<double> pmean(nchunk * C), pm2(nchunk * C), pcnt(nchunk);
  at::parallel_for(0, nchunk, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> shv(C), sv(C), qv(C);
    acc_t* __restrict sh = shv.data();
    acc_t* __restrict s = sv.data();
    acc_t* __restrict q = qv.data();
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * R / nchunk, r1 = (k + 1) * R / nchunk;
      double* pm = pmean.data() + k * C;
      double* pq = pm2.data() + k * C;
      double na = 0;
      for (int64_t rs = r0; rs < r1; rs += kSubRows) {
        const int64_t re = std::min(rs + kSubRows, r1);
        const double kk = double(re - rs);
        for (int64_t c = 0; c < C; ++c) {
          sh[c] = acc_t(x[rs * C + c]);
          s[c] = 0;
          q[c] = 0;
        }
        int64_t r = rs;
        for (; r + 4 <= re; r += 4) {  // four rows per sweep: a quarter of the accumulator traffic
          const scalar_t* x0 = x + r * C;
          const scalar_t* x1 = x0 + C;
          const scalar_t* x2 = x1 + C;
          const scalar_t* x3 = x2 + C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t m = sh[c];
            const acc_t d0 = acc_t(x0[c]) - m, d1 = acc_t(x1[c]) - m;
            const acc_t d2 = acc_t(x2[c]) - m, d3 = acc_t(x3[c]) - m;
            s[c] += (d0 + d1) + (d2 + d3);
            q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
          }
        }
        for (; r < re; ++r) {
          const scalar_t* xr = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = acc_t(xr[c]) - sh[c];
            s[c] += d;
            q[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) {  // Chan et al.: merge the sub-block into the chunk
          const double dm = double(s[c]) / kk, bm = double(sh[c]) + dm;
          const double bq = std::max(double(q[c]) - double(s[c]) * dm, 0.0);
          if (na == 0) {
            pm[c] = bm;
            pq[c] = bq;
          } else {
            const double tot = na + kk, delta = bm - pm[c];
            pm[c] += delta * (kk / tot);
            pq[c] += bq + delta * delta * (na * kk / tot);
          }
        }
        na += kk;
      }
      pcnt[k] = na;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, tot = 0;
    for (int64_t k = 0; k < nchunk; ++k) {
      s += pmean[k * C + c] * pcnt[k];
      tot += pcnt[k];
    }
    const double mu = s / tot;
    double m2 = 0;
    for (int64_t k = 0; k < nchunk; ++k) {
      const double d = pmean[k * C + c] - mu;
      m2 += pm2[k * C + c] + pcnt[k] * d * d;
    }
    mean[c] = mu;
    var[c] = m2 / tot;
  }
}

template <typename scalar_t>
void stats(const Tensor& x, const Geo& g, double* mean, double* var) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const bool small = g.numel() < kSerialBelow;
  if (g.rows) {
    small ? rows_stats<scalar_t, double>(xp, g, mean, var)
          : rows_stats<scalar_t, op_t<scalar_t>>(xp, g, mean, var);
  } else {
    small ? planes_stats<scalar_t, double>(xp, g, mean, var)
          : planes_stats<scalar_t, op_t<scalar_t>>(xp, g, mean, var);
  }
}

// ================================================================== y = act(γ x̂ + β)
// act(z) and act'(z) as torch computes them (torch/csrc and ATen's activation kernels): the
// same branch points, so the fused layer's gradients equal BN followed by torch's module. Where
// torch divides by 3 or 6, these multiply by the reciprocal (an ulp apart at most): a vector
// divide would cost more than the memory traffic of the loops it sits in.
template <typename T>
inline T sigmoid(T z) { return T(1) / (T(1) + std::exp(-z)); }

constexpr double kSqrt1_2 = 0.70710678118654752440, kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kGeluBeta = 0.79788456080286535588, kGeluKappa = 0.044715;  // sqrt(2/π)

template <int ACT, typename T>
inline T act_value(T z, T alpha) {
  switch (ACT) {
    case ACT_RELU6: return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
    case ACT_SILU: return z * sigmoid(z);
    case ACT_HARDSWISH: return z <= T(-3) ? T(0) : (z >= T(3) ? z : z * (z + T(3)) * T(1.0 / 6));
    case ACT_HARDSIGMOID: return z <= T(-3) ? T(0) : (z >= T(3) ? T(1) : z * T(1.0 / 6) + T(0.5));
    case ACT_GELU: return T(0.5) * z * (T(1) + std::erf(z * T(kSqrt1_2)));
    case ACT_GELU_TANH:
      return T(0.5) * z * (T(1) + std::tanh(T(kGeluBeta) * (z + T(kGeluKappa) * z * z * z)));
    case ACT_ELU: return z > T(0) ? z : alpha * (std::exp(z) - T(1));
    case ACT_MISH: return z * std::tanh(std::log1p(std::exp(z)));
    case ACT_SIGMOID: return sigmoid(z);
    case ACT_TANH: return std::tanh(z);
    default: return z;
  }
}

template <int ACT, typename T>
inline T act_slope(T z, T alpha) {  // act'(z)
  switch (ACT) {
    case ACT_RELU6: return (z > T(0) && z < T(6)) ? T(1) : T(0);
    case ACT_SILU: {
      const T s = sigmoid(z);
      return s * (T(1) + z * (T(1) - s));
    }
    case ACT_HARDSWISH: return z < T(-3) ? T(0) : (z <= T(3) ? z * T(1.0 / 3) + T(0.5) : T(1));
    case ACT_HARDSIGMOID: return (z > T(-3) && z < T(3)) ? T(1) / T(6) : T(0);
    case ACT_GELU:
      return T(0.5) * (T(1) + std::erf(z * T(kSqrt1_2))) +
             z * T(kInvSqrt2Pi) * std::exp(T(-0.5) * z * z);
    case ACT_GELU_TANH: {
      const T inner = T(kGeluBeta) * (z + T(kGeluKappa) * z * z * z);
      const T t = std::tanh(inner);
      return T(0.5) * (T(1) + t) +
             T(0.5) * z * (T(1) - t * t) * T(kGeluBeta) * (T(1) + T(3 * kGeluKappa) * z * z);
    }
    case ACT_ELU: return z > T(0) ? T(1) : alpha * std::exp(z);
    case ACT_MISH: {
      const T t = std::tanh(std::log1p(std::exp(z)));
      return t + z * sigmoid(z) * (T(1) - t * t);
    }
    case ACT_SIGMOID: {
      const T s = sigmoid(z);
      return s * (T(1) - s);
    }
    case ACT_TANH: {
      const T t = std::tanh(z);
      return T(1) - t * t;
    }
    default: return T(1);
  }
}

template <int ACT, typename T>
inline T activate(T z, T sl) {
  if constexpr (ACT == ACT_RELU) return z < T(0) ? T(0) : z;  // NaN stays NaN
  else if constexpr (ACT == ACT_LEAKY) return z < T(0) ? z * sl : z;
  else if constexpr (ACT >= ACT_RELU6) return act_value<ACT>(z, sl);
  else return z;
}

// One plane: y_i = act((x_i − μ_hi)·a + bb).
template <typename scalar_t, int ACT, typename T>
inline void affine_plane(const scalar_t* __restrict xr, scalar_t* __restrict yr, int64_t L,
                         const Coeffs<T>& k, T sl) {
  const T m = k.mhi, aa = k.a, b0 = k.bb;
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) yr[i] = scalar_t(activate<ACT>((T(xr[i]) - m) * aa + b0, sl));
}

template <typename scalar_t, int ACT>
void affine(const scalar_t* x, scalar_t* y, const Geo& g, const Affine<op_t<scalar_t>>& k,
            double slope) {
  using T = op_t<scalar_t>;
  const T sl = T(slope);
  const int64_t C = g.C, L = g.L;
  if (!g.rows) {
    at::parallel_for(0, g.outer * C, std::max<int64_t>(1, kGrain / L), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) affine_plane<scalar_t, ACT>(x + p * L, y + p * L, L, k[p % C], sl);
    });
    return;
  }
  const T* __restrict mhi = k.mhi.data();
  const T* __restrict a = k.a.data();
  const T* __restrict bb = k.bb.data();
  at::parallel_for(0, g.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = x + r * C;
      scalar_t* yr = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        yr[c] = scalar_t(activate<ACT>((T(xr[c]) - mhi[c]) * a[c] + bb[c], sl));
    }
  });
}

// f(std::integral_constant<int, ACT>{}) for the activation code act: one compiled kernel per
// activation, chosen once per call.
template <int ACT = ACT_NONE, typename F>
void with_act(int act, F&& f) {
  if constexpr (ACT <= ACT_LAST) {
    if (act == ACT) return f(std::integral_constant<int, ACT>{});
    return with_act<ACT + 1>(act, std::forward<F>(f));
  }
}

template <typename scalar_t>
void affine_any(const Tensor& x, Tensor& y, const Geo& g, const Affine<op_t<scalar_t>>& k, int act,
                double slope) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  with_act(act, [&](auto a) { affine<scalar_t, decltype(a)::value>(xp, yp, g, k, slope); });
}

// The training forward in one sweep per channel (see sweeps): its moments, then its y.
template <typename scalar_t, int ACT>
void planes_forward_sweep(const scalar_t* x, scalar_t* y, const Geo& g, const std::vector<double>& w,
                          const std::vector<double>& b, double eps, double slope, double* mean,
                          double* var) {
  using T = op_t<scalar_t>;
  const PlaneItems pi(g);
  const int64_t C = g.C, L = g.L, N = g.outer;
  const T sl = T(slope);
  at::parallel_for(0, C, sweep_grain(g), [&](int64_t c0, int64_t c1) {
    std::vector<Moments> mc(pi.per_channel());
    for (int64_t c = c0; c < c1; ++c) {
      int64_t j = 0;
      pi.each_of_channel(c, [&](int64_t i) { mc[j++] = item_moments<scalar_t, T>(x, g, pi, i); });
      merge_moments(mc.data(), j, mean[c], var[c]);
      const Coeffs<T> k = coeffs<T>(mean[c], var[c], w[c], b[c], eps);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t off = (n * C + c) * L;
        affine_plane<scalar_t, ACT>(x + off, y + off, L, k, sl);
      }
    }
  });
}

#define BN_DISPATCH(dtype, ...)                                                   \
  [&] {                                                                           \
    switch (dtype) {                                                              \
      case at::kDouble: { using scalar_t = double; return __VA_ARGS__(); }        \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); } \
      default: { using scalar_t = float; return __VA_ARGS__(); }                  \
    }                                                                             \
  }()

void check_supported(const Tensor& x, const char* what) {
  TORCH_CHECK_VALUE(supported(x), "batchnorm C++ kernels: ", what,
                    " must be a non-empty float32/float64/bfloat16 CPU tensor of rank 2-5, "
                    "contiguous or channels_last; got dtype ", x.scalar_type(), ", shape ",
                    x.sizes(), ", strides ", x.strides());
}

// Training forward: (act(γ x̂ + β), μ_B, σ²_B biased), statistics in float64; γ and β as the
// float64 vectors of as_f64.
std::tuple<Tensor, Tensor, Tensor> forward_act_v(const Tensor& x, const std::vector<double>& wv,
                                                 const std::vector<double>& bv, double eps,
                                                 int64_t act, double slope) {
  check_supported(x, "x");
  const Geo g = geometry(x);
  const auto f64 = x.options().dtype(at::kDouble);
  Tensor mean = at::empty({g.C}, f64), var = at::empty({g.C}, f64);
  Tensor y = empty_like_cached(x);
  BN_DISPATCH(x.scalar_type(), [&] {
    double* mp = mean.mutable_data_ptr<double>();
    double* vp = var.mutable_data_ptr<double>();
    if (sweeps(g, sizeof(scalar_t))) {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      return with_act(int(act), [&](auto a) {
        planes_forward_sweep<scalar_t, decltype(a)::value>(xp, yp, g, wv, bv, eps, slope, mp, vp);
      });
    }
    stats<scalar_t>(x, g, mp, vp);
    Affine<op_t<scalar_t>> k(mp, vp, wv, bv, eps, g.C);
    affine_any<scalar_t>(x, y, g, k, int(act), slope);
  });
  return {y, mean, var};
}

// Inference: y = act((x − E[x])·γ/sqrt(Var[x] + ε) + β), one pass (Algorithm 2).
Tensor eval_forward(const Tensor& x, const Tensor& rm, const Tensor& rv, const Tensor& w,
                    const Tensor& b, double eps, int64_t act, double slope) {
  check_supported(x, "x");
  const Geo g = geometry(x);
  const auto mv = as_f64(rm, g.C, 0.0), vv = as_f64(rv, g.C, 1.0);
  const auto wv = as_f64(w, g.C, 1.0), bv = as_f64(b, g.C, 0.0);
  Tensor y = empty_like_cached(x);
  BN_DISPATCH(x.scalar_type(), [&] {
    Affine<op_t<scalar_t>> k(mv.data(), vv.data(), wv, bv, eps, g.C);
    affine_any<scalar_t>(x, y, g, k, int(act), slope);
  });
  return y;
}

// ================================================================== backward (Section 3)
// u is what backward reads per value: x − μ_hi (SAVED_X, SAVED_X_ACT) or the pre-activation z
// recovered from y (SAVED_Y), with x̂ = p·u + q per channel. dz is dy, or dy·slope where z ≤ 0
// (z recomputed from x; ReLU has slope 0) or where y < 0 (leaky ReLU inverted from its output).
template <int MODE, typename T>
inline void dz_u(T gv, T sv, T m, T aa, T b0, T sl, T isl, T& dz, T& u) {
  if constexpr (MODE == SAVED_Y) {
    const bool neg = sv < T(0);
    dz = neg ? gv * sl : gv;
    u = neg ? sv * isl : sv;
  } else {
    u = sv - m;
    if constexpr (MODE == SAVED_X_ACT) dz = (u * aa + b0 > T(0)) ? gv : gv * sl;
    else if constexpr (MODE >= kGen) dz = gv * act_slope<MODE - kGen>(u * aa + b0, sl);
    else dz = gv;
  }
}

// (slope, 1/slope) in the compute type; 1/slope is 0 for ReLU (slope 0, never inverted).
// Callers unpack it into named variables, not a structured binding: their parallel_for lambdas
// capture the two, which C++17 does not allow for bindings.
template <typename T>
inline std::pair<T, T> slopes(double slope) {
  return {T(slope), T(slope != 0.0 ? 1.0 / slope : 0.0)};
}

// The backward's per-channel sums: Σ dL/dz_i, Σ dL/dz_i · u_i, and Σ u_i (which re-centres u on
// the exact μ_B).
struct BwdSums {
  double dz, dz_u, u;
  BwdSums& operator+=(const BwdSums& o) {
    dz += o.dz;
    dz_u += o.dz_u;
    u += o.u;
    return *this;
  }
};

template <typename scalar_t, typename acc_t, int MODE, typename T = op_t<scalar_t>>
BwdSums item_bwd_sums(const scalar_t* dy, const scalar_t* s, const Geo& g, const PlaneItems& pi,
                      int64_t it, const Coeffs<T>& k, T sl, T isl) {
  const int64_t L = g.L, C = g.C;
  int64_t c, n0, n1, lo, hi;
  pi.decode(it, g, c, n0, n1, lo, hi);
  const int64_t len = hi - lo;
  const T m = k.mhi, aa = k.a, b0 = k.bb;
  alignas(64) acc_t v1[kLanes] = {}, v2[kLanes] = {}, v3[kLanes] = {};
  acc_t t1 = 0, t2 = 0, t3 = 0;
  const bool ahead = int64_t(len * sizeof(scalar_t)) < kPrefetchBelow;
  for (int64_t n = n0; ahead && n < std::min(n1, n0 + kAhead); ++n) {
    prefetch_plane(s + (n * C + c) * L + lo, len);
    prefetch_plane(dy + (n * C + c) * L + lo, len);
  }
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* sr = s + (n * C + c) * L + lo;
    const scalar_t* gr = dy + (n * C + c) * L + lo;
    if (ahead && n + kAhead < n1) {
      prefetch_plane(sr + kAhead * C * L, len);
      prefetch_plane(gr + kAhead * C * L, len);
    }
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        T dz, u;
        dz_u<MODE>(T(gr[i + j]), T(sr[i + j]), m, aa, b0, sl, isl, dz, u);
        v1[j] += acc_t(dz);
        v2[j] += acc_t(dz) * acc_t(u);
        v3[j] += acc_t(u);
      }
    }
    for (; i < len; ++i) {  // the tail in scalars (see item_moments)
      T dz, u;
      dz_u<MODE>(T(gr[i]), T(sr[i]), m, aa, b0, sl, isl, dz, u);
      t1 += acc_t(dz);
      t2 += acc_t(dz) * acc_t(u);
      t3 += acc_t(u);
    }
  }
  return {double(lane_sum(v1) + t1), double(lane_sum(v2) + t2), double(lane_sum(v3) + t3)};
}

template <typename scalar_t, typename acc_t, int MODE>
void planes_bwd_reduce(const scalar_t* dy, const scalar_t* s, const Geo& g,
                       const Affine<op_t<scalar_t>>& k, double slope, BwdSums* sums) {
  using T = op_t<scalar_t>;
  const std::pair<T, T> sp = slopes<T>(slope);
  const T sl = sp.first, isl = sp.second;
  const PlaneItems pi(g);
  std::vector<BwdSums> part(pi.items);
  at::parallel_for(0, pi.items, pi.grain(), [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it)
      part[it] = item_bwd_sums<scalar_t, acc_t, MODE>(dy, s, g, pi, it, k[pi.channel(it)], sl, isl);
  });
  for (int64_t c = 0; c < g.C; ++c) {
    BwdSums a{0, 0, 0};
    pi.each_of_channel(c, [&](int64_t i) { a += part[i]; });
    sums[c] = a;
  }
}

template <typename scalar_t, typename acc_t, int MODE>
void rows_bwd_reduce(const scalar_t* dy, const scalar_t* s, const Geo& g,
                     const Affine<op_t<scalar_t>>& k, double slope, BwdSums* sums) {
  using T = op_t<scalar_t>;
  const std::pair<T, T> sp = slopes<T>(slope);
  const T sl = sp.first, isl = sp.second;
  const int64_t R = g.outer, C = g.C, nchunk = row_chunks(R, C);
  std::vector<double> p1(nchunk * C, 0.0), p2(nchunk * C, 0.0), p3(nchunk * C, 0.0);
  const T* __restrict mhi = k.mhi.data();
  const T* __restrict a = k.a.data();
  const T* __restrict bb = k.bb.data();
  at::parallel_for(0, nchunk, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> v1(C), v2(C), v3(C);
    acc_t* __restrict t1 = v1.data();
    acc_t* __restrict t2 = v2.data();
    acc_t* __restrict t3 = v3.data();
    for (int64_t kc = k0; kc < k1; ++kc) {
      const int64_t r0 = kc * R / nchunk, r1 = (kc + 1) * R / nchunk;
      for (int64_t rs = r0; rs < r1; rs += kSubRows) {
        const int64_t re = std::min(rs + kSubRows, r1);
        std::fill(t1, t1 + C, acc_t(0));
        std::fill(t2, t2 + C, acc_t(0));
        std::fill(t3, t3 + C, acc_t(0));
        int64_t r = rs;
        for (; r + 2 <= re; r += 2) {  // two rows per sweep: half the accumulator traffic
          const scalar_t* sa = s + r * C;
          const scalar_t* sb = sa + C;
          const scalar_t* ga = dy + r * C;
          const scalar_t* gb = ga + C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            T dz0, u0, dz1, u1;
            dz_u<MODE>(T(ga[c]), T(sa[c]), mhi[c], a[c], bb[c], sl, isl, dz0, u0);
            dz_u<MODE>(T(gb[c]), T(sb[c]), mhi[c], a[c], bb[c], sl, isl, dz1, u1);
            t1[c] += acc_t(dz0) + acc_t(dz1);
            t2[c] += acc_t(dz0) * acc_t(u0) + acc_t(dz1) * acc_t(u1);
            t3[c] += acc_t(u0) + acc_t(u1);
          }
        }
        for (; r < re; ++r) {
          const scalar_t* sr = s + r * C;
          const scalar_t* gr = dy + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            T dz, u;
            dz_u<MODE>(T(gr[c]), T(sr[c]), mhi[c], a[c], bb[c], sl, isl, dz, u);
            t1[c] += acc_t(dz);
            t2[c] += acc_t(dz) * acc_t(u);
            t3[c] += acc_t(u);
          }
        }
        double* q1 = p1.data() + kc * C;
        double* q2 = p2.data() + kc * C;
        double* q3 = p3.data() + kc * C;
        for (int64_t c = 0; c < C; ++c) {  // flush the sub-block's sums into float64
          q1[c] += double(t1[c]);
          q2[c] += double(t2[c]);
          q3[c] += double(t3[c]);
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double a1 = 0, a2 = 0, a3 = 0;
    for (int64_t kc = 0; kc < nchunk; ++kc) {
      a1 += p1[kc * C + c];
      a2 += p2[kc * C + c];
      a3 += p3[kc * C + c];
    }
    sums[c] = {a1, a2, a3};
  }
}

// Per channel (Section 3): dγ = Σ dz·x̂, dβ = Σ dz, and
//   dx = γ/σ · (dz − Σdz/m − x̂ · Σdz·x̂/m),  σ = sqrt(σ²_B + ε),
// written as dx = A·dz + B·u + K with x̂ = p·u + q.
template <typename T>
struct DxCoeffs {
  T A, B, K;
};

template <int MODE, typename T>
DxCoeffs<T> dx_coeffs(const BwdSums& s, double var, double w, double b, double eps, double m,
                      double& dgamma) {
  const double invstd = 1.0 / std::sqrt(var + eps);
  double p, q;
  if (MODE == SAVED_Y) {  // u = z = γ x̂ + β
    p = 1.0 / w;
    q = -b / w;
  } else {  // u = x − μ_hi, x̂ = (u − mean(u))/σ
    p = invstd;
    q = -(s.u / m) * invstd;
  }
  dgamma = p * s.dz_u + q * s.dz;  // dL/dγ = Σ dL/dy_i · x̂_i
  const double A = w * invstd, K = -A * dgamma / m;
  return {T(A), T(K * p), T(-A * s.dz / m + K * q)};
}

// One plane of dL/dx.
template <typename scalar_t, int MODE, typename T>
inline void dx_plane(const scalar_t* __restrict gr, const scalar_t* __restrict sr,
                     scalar_t* __restrict out, int64_t L, const Coeffs<T>& k, const DxCoeffs<T>& d,
                     T sl, T isl) {
  const T m = k.mhi, aa = k.a, b0 = k.bb, A = d.A, B = d.B, K = d.K;
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) {
    T dz, u;
    dz_u<MODE>(T(gr[i]), T(sr[i]), m, aa, b0, sl, isl, dz, u);
    out[i] = scalar_t(A * dz + B * u + K);  // dL/dx_i, Section 3 collapsed
  }
}

template <typename scalar_t, int MODE>
void bwd_dx(const scalar_t* dy, const scalar_t* s, scalar_t* dx, const Geo& g,
            const Affine<op_t<scalar_t>>& k, double slope,
            const std::vector<DxCoeffs<op_t<scalar_t>>>& d) {
  using T = op_t<scalar_t>;
  const std::pair<T, T> sp = slopes<T>(slope);
  const T sl = sp.first, isl = sp.second;
  const int64_t C = g.C, L = g.L;
  if (!g.rows) {
    at::parallel_for(0, g.outer * C, std::max<int64_t>(1, kGrain / L), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        dx_plane<scalar_t, MODE>(dy + p * L, s + p * L, dx + p * L, L, k[p % C], d[p % C], sl, isl);
    });
    return;
  }
  std::vector<T> ka(C), kb(C), kc(C);  // one vector per coefficient: the loop over c vectorizes
  for (int64_t c = 0; c < C; ++c) ka[c] = d[c].A, kb[c] = d[c].B, kc[c] = d[c].K;
  const T* __restrict mhi = k.mhi.data();
  const T* __restrict a = k.a.data();
  const T* __restrict bb = k.bb.data();
  const T* __restrict A = ka.data();
  const T* __restrict B = kb.data();
  const T* __restrict K = kc.data();
  at::parallel_for(0, g.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* sr = s + r * C;
      const scalar_t* gr = dy + r * C;
      scalar_t* out = dx + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        T dz, u;
        dz_u<MODE>(T(gr[c]), T(sr[c]), mhi[c], a[c], bb[c], sl, isl, dz, u);
        out[c] = scalar_t(A[c] * dz + B[c] * u + K[c]);
      }
    }
  });
}

// The backward in one sweep per channel (see planes_forward_sweep): the channel's sums, then its
// dx while its dy and saved values are still in cache. The same items, sums and merge order as
// planes_bwd_reduce + bwd_dx, so the same numbers (see sweeps).
template <typename scalar_t, int MODE>
void planes_backward_sweep(const scalar_t* dy, const scalar_t* s, scalar_t* dx, const Geo& g,
                           const double* mean, const double* var, const std::vector<double>& w,
                           const std::vector<double>& b, double eps, double slope, double* dgamma,
                           double* dbeta) {
  using T = op_t<scalar_t>;
  const std::pair<T, T> sp = slopes<T>(slope);
  const T sl = sp.first, isl = sp.second;
  const PlaneItems pi(g);
  const int64_t C = g.C, L = g.L, N = g.outer;
  const double m = double(N * L);
  at::parallel_for(0, C, sweep_grain(g), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Coeffs<T> k = coeffs<T>(mean[c], var[c], w[c], b[c], eps);
      BwdSums a{0, 0, 0};
      pi.each_of_channel(
          c, [&](int64_t i) { a += item_bwd_sums<scalar_t, T, MODE>(dy, s, g, pi, i, k, sl, isl); });
      dbeta[c] = a.dz;
      const DxCoeffs<T> d = dx_coeffs<MODE, T>(a, var[c], w[c], b[c], eps, m, dgamma[c]);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t off = (n * C + c) * L;
        dx_plane<scalar_t, MODE>(dy + off, s + off, dx + off, L, k, d, sl, isl);
      }
    }
  });
}

template <typename scalar_t, int MODE>
void backward_impl(const Tensor& dy, const Tensor& saved, const Geo& g, const double* mean,
                   const double* var, const std::vector<double>& w, const std::vector<double>& b,
                   double eps, double slope, Tensor& dx, double* dgamma, double* dbeta) {
  using T = op_t<scalar_t>;
  const int64_t C = g.C;
  const scalar_t* gp = dy.const_data_ptr<scalar_t>();
  const scalar_t* sp = saved.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  if (sweeps(g, sizeof(scalar_t))) {
    return planes_backward_sweep<scalar_t, MODE>(gp, sp, dxp, g, mean, var, w, b, eps, slope,
                                                 dgamma, dbeta);
  }
  const Affine<T> k(mean, var, w, b, eps, C);
  std::vector<BwdSums> sums(C);
  const bool small = g.numel() < kSerialBelow;
  if (g.rows) {
    small ? rows_bwd_reduce<scalar_t, double, MODE>(gp, sp, g, k, slope, sums.data())
          : rows_bwd_reduce<scalar_t, T, MODE>(gp, sp, g, k, slope, sums.data());
  } else {
    small ? planes_bwd_reduce<scalar_t, double, MODE>(gp, sp, g, k, slope, sums.data())
          : planes_bwd_reduce<scalar_t, T, MODE>(gp, sp, g, k, slope, sums.data());
  }
  const double m = double(g.numel() / C);
  std::vector<DxCoeffs<T>> d(C);
  for (int64_t c = 0; c < C; ++c) {
    dbeta[c] = sums[c].dz;
    d[c] = dx_coeffs<MODE, T>(sums[c], var[c], w[c], b[c], eps, m, dgamma[c]);
  }
  bwd_dx<scalar_t, MODE>(gp, sp, dxp, g, k, slope, d);
}

// (dL/dx, dL/dγ, dL/dβ) with dγ, dβ in float64, from x (SAVED_X / SAVED_X_ACT) or y (SAVED_Y).
// A (C,) tensor of dtype dt holding v (written directly for float32/float64: no conversion op).
Tensor vector_tensor(const std::vector<double>& v, at::ScalarType dt, const at::TensorOptions& o) {
  const int64_t C = int64_t(v.size());
  if (dt == at::kFloat) {
    Tensor t = at::empty({C}, o.dtype(at::kFloat));
    float* p = t.mutable_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) p[c] = float(v[c]);
    return t;
  }
  Tensor t = at::empty({C}, o.dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
  return dt == at::kDouble ? t : t.to(dt);
}

// dγ and dβ come back in gdtype and bdtype (the parameters' dtypes; float64 from the pybind entry).
std::tuple<Tensor, Tensor, Tensor> backward_act(const Tensor& dy_in, const Tensor& saved,
                                                const Tensor& mean, const Tensor& var,
                                                const Tensor& w, const Tensor& b, double eps,
                                                int64_t mode, double slope, int64_t act,
                                                at::ScalarType gdtype, at::ScalarType bdtype) {
  check_supported(saved, "the saved tensor");
  TORCH_CHECK_VALUE(mode >= SAVED_X && mode <= SAVED_X_GEN, "backward mode must be 0-3, got ",
                    mode);
  const Geo g = geometry(saved);
  TORCH_CHECK_VALUE(dy_in.sizes() == saved.sizes(), "dL/dy has shape ", dy_in.sizes(),
                    " but the saved tensor has shape ", saved.sizes());
  const auto fmt = format_of(saved);
  const bool as_is = dy_in.scalar_type() == saved.scalar_type() && dy_in.is_contiguous(fmt);
  const Tensor dy = as_is ? dy_in : dy_in.to(saved.scalar_type()).contiguous(fmt);
  const auto mv = as_f64(mean, g.C, 0.0), vv = as_f64(var, g.C, 1.0);
  const auto wv = as_f64(w, g.C, 1.0), bv = as_f64(b, g.C, 0.0);
  std::vector<double> dgv(g.C), dbv(g.C);
  Tensor dx = empty_like_cached(saved);
  BN_DISPATCH(saved.scalar_type(), [&] {
    double* dg = dgv.data();
    double* db = dbv.data();
    const double* mp = mv.data();
    const double* vp = vv.data();
    switch (mode) {
      case SAVED_X_ACT:
        return backward_impl<scalar_t, SAVED_X_ACT>(dy, saved, g, mp, vp, wv, bv, eps, slope, dx,
                                                    dg, db);
      case SAVED_X_GEN:  // compiled per activation: MODE = kGen + its code
        return with_act<ACT_RELU6>(int(act), [&](auto a) {
          backward_impl<scalar_t, kGen + decltype(a)::value>(dy, saved, g, mp, vp, wv, bv, eps,
                                                             slope, dx, dg, db);
        });
      case SAVED_Y:
        return backward_impl<scalar_t, SAVED_Y>(dy, saved, g, mp, vp, wv, bv, eps, slope, dx, dg,
                                                db);
      default:
        return backward_impl<scalar_t, SAVED_X>(dy, saved, g, mp, vp, wv, bv, eps, slope, dx, dg,
                                                db);
    }
  });
  return {dx, vector_tensor(dgv, gdtype, saved.options()), vector_tensor(dbv, bdtype, saved.options())};
}

// ================================================================== running statistics
// running ← (1 − f)·running + f·batch, with the unbiased m/(m−1)·σ²_B (in place, no autograd).
template <typename T>
void ema_raw(T* rm, T* rv, const double* mean, const double* var, int64_t C, double f, double corr) {
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = T(double(rm[c]) + f * (mean[c] - double(rm[c])));
    rv[c] = T(double(rv[c]) + f * (var[c] * corr - double(rv[c])));
  }
}

void update_running(const Tensor& rm, const Tensor& rv, const Tensor& mean, const Tensor& var,
                    int64_t m, double factor) {
  const double corr = double(m) / double(m - 1);
  const double* mp = mean.const_data_ptr<double>();
  const double* vp = var.const_data_ptr<double>();
  const int64_t C = mean.numel();
  const auto dt = rm.scalar_type();
  const bool raw = rm.is_contiguous() && rv.is_contiguous() && rv.scalar_type() == dt &&
                   (dt == at::kFloat || dt == at::kDouble);
  if (raw && dt == at::kFloat) {
    ema_raw(rm.mutable_data_ptr<float>(), rv.mutable_data_ptr<float>(), mp, vp, C, factor, corr);
  } else if (raw) {
    ema_raw(rm.mutable_data_ptr<double>(), rv.mutable_data_ptr<double>(), mp, vp, C, factor, corr);
  } else {  // other dtypes or strides: torch ops
    at::NoGradGuard no_grad;
    rm.lerp_(mean.to(rm.options()), factor);
    rv.lerp_((var * corr).to(rv.options()), factor);
  }
  // Written through raw pointers: tell autograd the buffers changed, as an in-place op would.
  torch::autograd::impl::bump_version(rm);
  torch::autograd::impl::bump_version(rv);
}

// ================================================================== the op's autograd
// SAVE_OUTPUT (keep y, invert it in backward) is safe while every |γ_c| ≥ sqrt(ε_dtype)·max(1, |β_c|).
bool gamma_invertible(const std::vector<double>& w, const std::vector<double>& b, double tol) {
  for (size_t c = 0; c < w.size(); ++c)
    if (!(std::abs(w[c]) >= tol * std::max(1.0, std::abs(b[c])))) return false;
  return true;
}

double dtype_eps(at::ScalarType dt) {
  if (dt == at::kDouble) return std::numeric_limits<double>::epsilon();
  if (dt == at::kBFloat16) return 0.0078125;  // 2^-7
  return std::numeric_limits<float>::epsilon();
}

// A per-channel (C,) vector shaped to broadcast against x (N, C, *spatial).
Tensor channel_view(const Tensor& v, const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = v.numel();
  return v.view(shape);
}

// act'(z) in differentiable ATen ops (the create_graph backward of SAVED_X_GEN): the same
// formulas as act_slope, so their own derivative is act''(z), exactly.
Tensor act_slope_aten(int64_t act, const Tensor& z, double alpha) {
  switch (act) {
    case ACT_RELU6: return ((z > 0) & (z < 6)).to(z.scalar_type());
    case ACT_SILU: {
      const Tensor sg = z.sigmoid();
      return sg * (1 + z * (1 - sg));
    }
    case ACT_HARDSWISH: return at::where(z < -3, at::zeros_like(z), at::where(z <= 3, z / 3 + 0.5,
                                                                               at::ones_like(z)));
    case ACT_HARDSIGMOID: return ((z > -3) & (z < 3)).to(z.scalar_type()) / 6;
    case ACT_GELU: return 0.5 * (1 + (z * kSqrt1_2).erf()) + z * kInvSqrt2Pi * (-0.5 * z * z).exp();
    case ACT_GELU_TANH: {
      const Tensor t = (kGeluBeta * (z + kGeluKappa * z * z * z)).tanh();
      return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * kGeluBeta * (1 + 3 * kGeluKappa * z * z);
    }
    case ACT_ELU: return at::where(z > 0, at::ones_like(z), alpha * z.exp());
    case ACT_MISH: {
      const Tensor t = z.exp().log1p().tanh();
      return t + z * z.sigmoid() * (1 - t * t);
    }
    case ACT_SIGMOID: {
      const Tensor sg = z.sigmoid();
      return sg * (1 - sg);
    }
    case ACT_TANH: {
      const Tensor t = z.tanh();
      return 1 - t * t;
    }
    default: return at::ones_like(z);
  }
}

// The backward in differentiable ATen ops: used when the graph of the backward itself is
// recorded (create_graph=True: gradient penalties, Hessian-vector products, gradgradcheck), or
// when a gradient arrives for the statistics outputs. Every quantity is a function of tensors
// that carry their history (the saved x or y, and the saved outputs μ_B and σ²_B), so autograd
// differentiates it exactly, to any order. With σ_B = sqrt(σ²_B + ε), x̂ = (x − μ_B)/σ_B,
// z = γ x̂ + β, y = act(z):
//   dz = act'(z)·dy,  dβ = Σ dz,  dγ = Σ dz·x̂,
//   dx = γ/σ_B·(dz − Σdz/m − x̂·Σ(dz·x̂)/m) + dL/dμ_B/m + dL/dσ²_B·2σ_B x̂/m
// (∂μ_B/∂x_i = 1/m and ∂σ²_B/∂x_i = 2(x_i − μ_B)/m). From the saved y (SAVED_Y), x̂ is
// (act⁻¹(y) − β)/γ: a function of y, whose own gradient is this node again.
variable_list differentiable_backward(const Tensor& gy, const Tensor& gmean, const Tensor& gvar,
                                      const Tensor& saved, const Tensor& w, const Tensor& b,
                                      const Tensor& mean, const Tensor& var, double eps,
                                      int64_t mode, double slope, int64_t act) {
  const int64_t C = saved.size(1);
  const double m = double(saved.numel() / C);
  std::vector<int64_t> dims = {0};
  for (int64_t d = 2; d < saved.dim(); ++d) dims.push_back(d);
  const auto f64 = saved.options().dtype(at::kDouble);
  const Tensor gamma = w.defined() ? w.to(at::kDouble) : at::ones({C}, f64);
  const Tensor beta = b.defined() ? b.to(at::kDouble) : at::zeros({C}, f64);
  const Tensor s = saved.to(at::kDouble);
  const Tensor invstd = (var + eps).rsqrt();  // 1/σ_B
  Tensor x_hat, dz;
  if (mode == SAVED_Y) {
    const Tensor neg = s < 0;
    const Tensor z = slope == 1.0 ? s : at::where(neg, s / slope, s);  // act⁻¹(y)
    x_hat = (z - channel_view(beta, s)) / channel_view(gamma, s);
    if (gy.defined()) dz = slope == 1.0 ? gy.to(at::kDouble) : at::where(neg, gy * slope, gy).to(at::kDouble);
  } else {
    x_hat = (s - channel_view(mean, s)) * channel_view(invstd, s);
    if (gy.defined()) {
      dz = gy.to(at::kDouble);
      if (mode == SAVED_X_ACT) {
        const Tensor pos = channel_view(gamma, s) * x_hat + channel_view(beta, s) > 0;
        dz = at::where(pos, dz, dz * slope);
      } else if (mode == SAVED_X_GEN) {
        dz = dz * act_slope_aten(act, channel_view(gamma, s) * x_hat + channel_view(beta, s),
                                 slope);
      }
    }
  }
  Tensor dx = at::zeros_like(x_hat), dgamma, dbeta;
  if (dz.defined()) {
    dbeta = dz.sum(dims);
    dgamma = (dz * x_hat).sum(dims);
    dx = channel_view(gamma * invstd, s) *
         (dz - channel_view(dbeta, s) / m - x_hat * channel_view(dgamma, s) / m);
  }
  if (gmean.defined()) dx = dx + channel_view(gmean.to(at::kDouble), s) / m;
  if (gvar.defined()) dx = dx + channel_view(gvar.to(at::kDouble) * 2.0 / invstd, s) * x_hat / m;
  return {dx.to(saved.scalar_type()),
          dgamma.defined() && w.defined() ? dgamma.to(w.scalar_type()) : Tensor(),
          dbeta.defined() && b.defined() ? dbeta.to(b.scalar_type()) : Tensor()};
}

// The running buffers travel as a plain struct, not as Tensor arguments: autograd then does not
// treat them as inputs of the node (they take no gradient).
struct Running {
  Tensor mean, var, count;  // count: num_batches_tracked, or undefined
};

// num_batches_tracked += 1 (in place, as the layer's own add_ would).
void count_batch(const Tensor& nbt) {
  if (nbt.device().is_cpu() && nbt.scalar_type() == at::kLong && nbt.is_contiguous()) {
    ++*nbt.mutable_data_ptr<int64_t>();
    torch::autograd::impl::bump_version(nbt);
  } else {
    at::NoGradGuard no_grad;
    nbt.add_(1);
  }
}

// Training BN (+ activation): outputs (y, μ_B, σ²_B biased), the statistics in float64.
struct TrainFn : public torch::autograd::Function<TrainFn> {
  // act: ACT_*; save: SAVE_INPUT / SAVE_OUTPUT / SAVE_AUTO (output when γ allows, input for ReLU).
  // γ and β are optional: only the ones given are inputs (edges) of the autograd node.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& w_,
                               const std::optional<Tensor>& b_, Running run, double eps,
                               double factor, int64_t act, double slope, int64_t save) {
    const Tensor w = w_.value_or(Tensor()), b = b_.value_or(Tensor());
    const int64_t C = x.size(1);
    const auto wv = as_f64(w, C, 1.0), bv = as_f64(b, C, 0.0);
    auto [y, mean, var] = forward_act_v(x, wv, bv, eps, act, slope);
    // The buffers move once the kernels have succeeded, and before anything is saved for backward:
    // a non-reentrant checkpoint stops its recomputation from inside save_for_backward.
    if (run.mean.defined()) update_running(run.mean, run.var, mean, var, x.numel() / C, factor);
    if (run.count.defined()) count_batch(run.count);
    int64_t mode = SAVED_X;
    double bslope = 1.0;
    if (act > ACT_LEAKY) {  // smooth or bounded: keep x, recompute z and act'(z) in backward
      mode = SAVED_X_GEN;
      bslope = slope;
    } else if (act != ACT_NONE || save != SAVE_INPUT) {
      if (save == SAVE_AUTO) {
        if (act == ACT_RELU) {
          save = SAVE_INPUT;
        } else {
          save = gamma_invertible(wv, bv, std::sqrt(dtype_eps(x.scalar_type())))
                     ? SAVE_OUTPUT
                     : SAVE_INPUT;
        }
      }
      mode = save == SAVE_OUTPUT ? SAVED_Y : SAVED_X_ACT;
      bslope = act == ACT_RELU ? 0.0 : act == ACT_LEAKY ? slope : 1.0;
    }
    // ONE activation-sized tensor for backward: x, or y when it can be inverted.
    ctx->save_for_backward({mode == SAVED_Y ? y : x, w, b, mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["slope"] = bslope;
    ctx->saved_data["act"] = act;
    ctx->set_materialize_grads(false);
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& w = saved[1];
    const Tensor& b = saved[2];
    // Edge indices count only the inputs that are tensors: x, then γ if given, then β if given.
    const size_t ew = 1, eb = w.defined() ? 2 : 1;
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = w.defined() && ctx->needs_input_grad(ew);
    const bool need_b = b.defined() && ctx->needs_input_grad(eb);
    variable_list out(9);  // one per forward argument: x, w, b, run, eps, factor, act, slope, save
    const Tensor &gy = grads[0], &gmean = grads[1], &gvar = grads[2];
    if (!(need_x || need_w || need_b) || !(gy.defined() || gmean.defined() || gvar.defined()))
      return out;
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const double slope = ctx->saved_data["slope"].toDouble();
    const int64_t act = ctx->saved_data["act"].toInt();
    Tensor dx, dgamma, dbeta;
    const double eps = ctx->saved_data["eps"].toDouble();
    // Batched gradients (autograd.grad(is_grads_batched=True) runs this under vmap) have no
    // storage for the kernels to read: the ATen ops take them, as they take create_graph.
    const bool batched = gy.defined() && !gy.has_storage();
    if (at::GradMode::is_enabled() || gmean.defined() || gvar.defined() || batched) {
      auto g = differentiable_backward(gy, gmean, gvar, saved[0], w, b, saved[3], saved[4], eps,
                                       mode, slope, act);
      dx = g[0], dgamma = g[1], dbeta = g[2];
    } else {  // the kernels: two passes over (dy, saved)
      std::tie(dx, dgamma, dbeta) = backward_act(
          gy, saved[0], saved[3], saved[4], w, b, eps, mode, slope, act,
          w.defined() ? w.scalar_type() : at::kDouble, b.defined() ? b.scalar_type() : at::kDouble);
    }
    if (need_x) out[0] = dx;
    if (need_w) out[1] = dgamma;
    if (need_b) out[2] = dbeta;
    return out;
  }
};

// ================================================================== the op
// batchnorm::batch_norm. Training: (act(BN(x)), μ_B, σ²_B biased) with the statistics in
// float64, the running statistics and num_batches_tracked updated in place (momentum < 0: the
// cumulative average, 1/t for the t-th batch). Inference (training = false): (act(BN(x)) with the
// running statistics, empty, empty), for calls that need no gradient.
// The caller (ops/op.py: fast_path_applies) sends only what these kernels compute exactly as
// torch's would; the checks below restate that contract. They run before anything is written, so
// a refused call changes no buffer.
void check_vector(const std::optional<Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->dim() == 1 && t->size(0) == C, "batchnorm::",
                    "batch_norm: ", name, " must be a CPU tensor of shape (", C, ",), got ",
                    t->sizes(), " on ", t->device());
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_op(
    const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b,
    const std::optional<Tensor>& rm, const std::optional<Tensor>& rv,
    const std::optional<Tensor>& nbt, bool training, double momentum, double eps, int64_t act,
    double slope, int64_t save) {
  check_supported(x, "input");
  TORCH_CHECK_VALUE(act >= ACT_NONE && act <= ACT_LAST, "batchnorm::batch_norm: act must be 0-",
                    ACT_LAST, ", got ", act);
  const int64_t C = x.size(1);
  check_vector(w, C, "weight");
  check_vector(b, C, "bias");
  check_vector(rm, C, "running_mean");
  check_vector(rv, C, "running_var");
  const bool track = rm.has_value() && rm->defined();
  TORCH_CHECK_VALUE(track == (rv.has_value() && rv->defined()),
                    "running_mean and running_var must both be tensors or both be None");
  if (!training) {
    TORCH_CHECK_VALUE(track, "inference needs running_mean and running_var");
    TORCH_CHECK(!(at::GradMode::is_enabled() &&
                  (x.requires_grad() || (w.has_value() && w->defined() && w->requires_grad()) ||
                   (b.has_value() && b->defined() && b->requires_grad()))),
                "batchnorm::batch_norm in inference is for calls that need no gradient; "
                "batchnorm.functional.batch_norm routes the others to torch's kernel");
    Tensor y = eval_forward(x, *rm, *rv, w.value_or(Tensor()), b.value_or(Tensor()), eps, act, slope);
    const auto empty = x.options().dtype(at::kDouble);
    return {y, at::empty({0}, empty), at::empty({0}, empty)};
  }
  TORCH_CHECK_VALUE(x.numel() >= 2 * C, "training needs more than 1 value per channel to compute "
                    "a variance, got input of shape ", x.sizes(), "; use a batch of at least 2, or "
                    "call .eval() to use the running statistics");
  const bool count = nbt.has_value() && nbt->defined();
  TORCH_CHECK_VALUE(momentum >= 0 || !track || count,
                    "momentum=None (cumulative average) needs num_batches_tracked");
  double factor = momentum;
  if (track && momentum < 0) factor = 1.0 / (double(nbt->item<int64_t>()) + 1.0);
  const Running run{track ? *rm : Tensor(), track ? *rv : Tensor(),
                    count && track ? *nbt : Tensor()};
  auto out = TrainFn::apply(x, w, b, run, eps, factor, act, slope, save);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY(batchnorm, m) {
  m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float momentum, "
        "float eps, int act, float slope, int save) -> (Tensor, Tensor, Tensor)");
}

// One kernel for both keys: with autograd it records TrainFn's node; below autograd (inference
// mode) the same call records nothing.
TORCH_LIBRARY_IMPL(batchnorm, Autograd, m) { m.impl("batch_norm", &batch_norm_op); }
TORCH_LIBRARY_IMPL(batchnorm, CPU, m) { m.impl("batch_norm", &batch_norm_op); }

// The op through the dispatcher, unboxed: what torch.ops.batchnorm.batch_norm does, without its
// boxed Python argument parsing (about 8 µs a call, as much as the kernels on a (60, 100) batch).
std::tuple<Tensor, Tensor, Tensor> call_op(
    const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b,
    const std::optional<Tensor>& rm, const std::optional<Tensor>& rv,
    const std::optional<Tensor>& nbt, bool training, double momentum, double eps, int64_t act,
    double slope, int64_t save) {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("batchnorm::batch_norm", "")
                                 .typed<decltype(batch_norm_op)>();
  return handle.call(x, w, b, rm, rv, nbt, training, momentum, eps, act, slope, save);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "batchnorm's C++ CPU kernels: the op batchnorm::batch_norm and its output cache";
  m.def("batch_norm", &call_op, "the op batchnorm::batch_norm, called through the dispatcher");
  m.def("cache_set_limit", &cache_set_limit, "set the idle-byte limit of the output cache");
  m.def("cache_empty", &cache_empty, "free the idle cached buffers");
  m.def("cache_info", &cache_info, "the output cache's counters");
}
