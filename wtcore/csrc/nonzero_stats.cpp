// Per-row nonzero and N:M block counts, and per-input activity, of many weights in one pass.
//
// `wt_native::nonzero_stats`, the CPU kernel of the `wt::nonzero_stats` operator (wtcore/native.py; see its
// docstring for why it exists). Each row of a weight [o, c, k] is read ONCE as unsigned bit patterns; an element counts as
// nonzero when its magnitude bits `a` satisfy lo <= a <= hi (lo = 1, hi = all magnitude bits: x != 0, NaN
// included; or lo = the first pattern above the tolerance, hi = +inf: |x| > tol, NaN excluded). The 0/1
// bytes of the row go to a per-thread buffer in L1; block sums, row counts and column activity are byte
// arithmetic on that buffer, so nothing the size of a weight is written. Rows are spread over torch's
// intra-op pool (at::parallel_for); each pool thread ORs the activity of its rows into its own buffer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

template <int W> struct Bits;
template <> struct Bits<2> { using type = uint16_t; static constexpr uint16_t mag = 0x7FFFu; };
template <> struct Bits<4> { using type = uint32_t; static constexpr uint32_t mag = 0x7FFFFFFFu; };
template <> struct Bits<8> { using type = uint64_t; static constexpr uint64_t mag = 0x7FFFFFFFFFFFFFFFull; };

template <typename T>
int64_t indicator(const T* x, int64_t n, T mag, T lo, T span, uint8_t* e, uint8_t* acc) {
  int64_t nnz = 0;
  for (int64_t j = 0; j < n; j++) {
    uint8_t v = static_cast<T>((x[j] & mag) - lo) <= span;
    e[j] = v;
    acc[j] |= v;
    nnz += v;
  }
  return nnz;
}

// blocks of m inputs, k kernel positions apart: per (block, position) the sum of m indicator bytes.
// For k > 1 the sums s[i] = e[i] + e[i+k] + ... + e[i+(m-1)k] are taken at EVERY i, vector-wide, and kept
// where i is among the first k of its block (`first`): m times the needed adds, all vectorized (a loop
// over the k positions of one block would not be).
void blocks(const uint8_t* e, const uint8_t* first, int64_t nb, int64_t m, int64_t k, int64_t keep, int32_t* s,
            int64_t* eq, int64_t* le) {
  int64_t a = 0, b = 0;
  if (k == 1 && m == 4) {  // one 32-bit word per block, its byte sum in the top byte
    for (int64_t i = 0; i < nb; i++) {
      uint32_t w;
      std::memcpy(&w, e + 4 * i, 4);
      uint32_t v = (w * 0x01010101u) >> 24;
      a += v == static_cast<uint32_t>(keep);
      b += v <= static_cast<uint32_t>(keep);
    }
  } else if (m == 4) {
    const int64_t n = (nb * m - (m - 1)) * k;
    const uint8_t kp = static_cast<uint8_t>(keep > 255 ? 255 : keep);
    int32_t a32 = 0, b32 = 0;
    for (int64_t i = 0; i < n; i++) {
      uint8_t v = e[i] + e[i + k] + e[i + 2 * k] + e[i + 3 * k];
      a32 += (v == kp) & first[i];
      b32 += (v <= kp) & first[i];
    }
    a = a32;
    b = b32;
  } else {
    const int64_t n = (nb * m - (m - 1)) * k;
    for (int64_t i = 0; i < n; i++) s[i] = e[i];
    for (int64_t j = 1; j < m; j++) {
      const uint8_t* ej = e + j * k;
      for (int64_t i = 0; i < n; i++) s[i] += ej[i];
    }
    for (int64_t i = 0; i < n; i++) {
      a += (s[i] == keep) & first[i];
      b += (s[i] <= keep) & first[i];
    }
  }
  *eq = a;
  *le = b;
}

struct Task {
  int64_t w, r0, r1;
};

}  // namespace

// ws: 2+-dim contiguous CPU float tensors [o, c, *k]; lo/hi: each weight's nonzero range of magnitude bits.
// Returns (int64 [3, sum o]: nonzeros, m-blocks with exactly keep / at most keep nonzeros per row;
// uint8 [sum c]: 1 where an input has a nonzero in some row and kernel position).
std::tuple<at::Tensor, at::Tensor> nonzero_stats(at::TensorList ws, at::IntArrayRef lo, at::IntArrayRef hi, int64_t m,
                                                 int64_t keep) {
  TORCH_CHECK(ws.size() == lo.size() && ws.size() == hi.size(), "wt::nonzero_stats: one (lo, hi) per weight");
  TORCH_CHECK(m >= 1, "wt::nonzero_stats: m must be >= 1");
  const int64_t n = static_cast<int64_t>(ws.size());
  std::vector<int64_t> o(n), c(n), k(n), row_off(n), col_off(n), out_col(n);
  int64_t rows_total = 0, col_len = 0, cols_total = 0, row_max = 1;
  std::vector<Task> tasks;
  std::vector<std::vector<uint8_t>> first(n);  // 1 at the first k entries of every block of m * k
  for (int64_t i = 0; i < n; i++) {
    const auto& w = ws[i];
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() >= 2, "wt::nonzero_stats: weight ", i,
                " must be a contiguous 2+-dim CPU tensor");
    o[i] = w.size(0);
    c[i] = w.size(1);
    k[i] = w.numel() / std::max<int64_t>(o[i] * c[i], 1);
    row_off[i] = rows_total;
    col_off[i] = col_len;
    out_col[i] = cols_total;
    rows_total += o[i];
    col_len += c[i] * k[i];
    cols_total += c[i];
    row_max = std::max(row_max, c[i] * k[i]);
    if (c[i] / m > 0 && !(k[i] == 1 && m == 4)) {
      first[i].resize(c[i] * k[i]);
      for (int64_t j = 0; j < c[i] * k[i]; j++) first[i][j] = (j % (m * k[i])) < k[i];
    }
    int64_t step = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(c[i] * k[i], 1));
    for (int64_t r = 0; r < o[i]; r += step) tasks.push_back({i, r, std::min(r + step, o[i])});
  }
  auto rows = at::empty({3, rows_total}, at::kLong);
  auto cols = at::empty({cols_total}, at::kByte);
  int64_t* R = rows.data_ptr<int64_t>();
  const int threads = at::get_num_threads();
  std::vector<uint8_t> acc(static_cast<size_t>(threads) * col_len + 1, 0);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    uint8_t* mine = acc.data() + static_cast<size_t>(at::get_thread_num()) * col_len;
    std::vector<uint8_t> e(row_max);
    std::vector<int32_t> sums(m == 4 ? 1 : row_max);
    for (int64_t ti = begin; ti < end; ti++) {
      const Task& t = tasks[ti];
      const auto& w = ws[t.w];
      const int64_t len = c[t.w] * k[t.w], nb = c[t.w] / m;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "wt_nonzero_stats", [&] {
        using B = Bits<sizeof(scalar_t)>;
        using T = typename B::type;
        const T* data = reinterpret_cast<const T*>(w.const_data_ptr<scalar_t>());
        const T l = static_cast<T>(lo[t.w]), span = static_cast<T>(static_cast<T>(hi[t.w]) - l);
        for (int64_t r = t.r0; r < t.r1; r++) {
          int64_t nnz = indicator<T>(data + r * len, len, B::mag, l, span, e.data(), mine + col_off[t.w]);
          int64_t eq = 0, le = 0;
          if (nb > 0) blocks(e.data(), first[t.w].data(), nb, m, k[t.w], keep, sums.data(), &eq, &le);
          const int64_t i = row_off[t.w] + r;
          R[i] = nnz;
          R[rows_total + i] = eq;
          R[2 * rows_total + i] = le;
        }
      });
    }
  });
  for (int t = 1; t < threads; t++) {  // the threads' activity OR-ed, then over each input's kernel positions
    const uint8_t* src = acc.data() + static_cast<size_t>(t) * col_len;
    for (int64_t j = 0; j < col_len; j++) acc[j] |= src[j];
  }
  uint8_t* C = cols.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; i++) {
    const uint8_t* src = acc.data() + col_off[i];
    for (int64_t ci = 0; ci < c[i]; ci++) {
      uint8_t any = 0;
      for (int64_t q = 0; q < k[i]; q++) any |= src[ci * k[i] + q];
      C[out_col[i] + ci] = any;
    }
  }
  return {rows, cols};
}

TORCH_LIBRARY(wt_native, lib) {
  lib.def("nonzero_stats(Tensor[] ws, int[] lo, int[] hi, int m, int keep) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(wt_native, CPU, lib) { lib.impl("nonzero_stats", &nonzero_stats); }
