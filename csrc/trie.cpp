// genrec_fast._trie: a static trie over Semantic IDs (L codes per item).
//
// Built from an [N, L] int32 code table: rows are sorted lexicographically (LSD radix sort on a
// packed key when the codes fit in 64 bits, a comparison sort otherwise), then one pass numbers
// the nodes of every depth from "the first position where the sorted rows differ". Nodes of depth
// d (= prefixes of length d) are numbered 0..n_d-1 in sorted order, so the children of one node
// are a contiguous run of ids at depth d+1: the CSR entry j of depth d *is* child node j.
// No torch here: arrays go out as numpy buffers (see ../shared/DESIGN.md, "The trie").
// Error paths are kept plain: no C++ exception crosses the binding (bad input comes back as a value,
// error() / None / -1, and genrec_fast.trie.SIDTrie raises the Python error) and messages are built
// from std::string, without iostreams. On the lent GPU image (Python 3.12, torch 2.11, its own compiler
// and pybind11) an error path that formatted its message with std::ostringstream, or threw through
// pybind11, killed the process with SIGSEGV (cause not found); the paths as written here do neither.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Error text from std::string and std::to_string only (no iostreams: see the file comment).
struct Msg {
  std::string s;
  Msg& operator<<(const char* x) { s += x; return *this; }
  Msg& operator<<(const std::string& x) { s += x; return *this; }
  template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
  Msg& operator<<(T x) { s += std::to_string(x); return *this; }
  const std::string& str() const { return s; }
};

std::string sid_repr(const int32_t* row, int L) {
  Msg os;
  os << "(";
  for (int l = 0; l < L; ++l) os << (l ? ", " : "") << row[l];
  os << ")";
  return os.str();
}

int bits_for(int64_t k) {  // bits needed to store codes 0..k-1
  int b = 0;
  while ((int64_t(1) << b) < k) ++b;
  return b;
}

}  // namespace

class Trie {
 public:
  // The arrays come by const reference: the binding releases the GIL around this constructor, so it
  // must not copy, move or destroy a Python object (a by-value array would be decref'd without the GIL).
  Trie(const py::array_t<int32_t, py::array::c_style>& codes, const std::vector<int64_t>& codebook_sizes,
       const py::array_t<int64_t, py::array::c_style>& item_ids, bool allow_duplicates) {
    if (codes.ndim() != 2) { fail("codes must be a 2-D array [N, L]"); return; }
    N_ = codes.shape(0);
    L_ = static_cast<int>(codes.shape(1));
    if (N_ == 0) { fail("empty catalogue: codes has no rows"); return; }
    if (L_ == 0) { fail("codes has zero levels (shape [N, 0])"); return; }
    if (static_cast<int>(codebook_sizes.size()) != L_) {
      Msg os;
      os << "codebook_sizes has " << codebook_sizes.size() << " entries, codes has " << L_ << " levels";
      fail(os.str());
      return;
    }
    for (int l = 0; l < L_; ++l)
      if (codebook_sizes[l] <= 0 || codebook_sizes[l] > (int64_t(1) << 30)) {
        Msg os;
        os << "codebook size of level " << l << " must be in 1..2^30, got " << codebook_sizes[l];
        fail(os.str());
        return;
      }
    if (item_ids.ndim() != 1 || item_ids.shape(0) != N_) {
      Msg os;
      os << "item_ids must be 1-D with " << N_ << " entries";
      fail(os.str());
      return;
    }
    K_ = codebook_sizes;
    const int32_t* c = codes.data();
    const int64_t* ids = item_ids.data();

    // 1. range check, naming the first offending rows
    {
      std::vector<int64_t> bad;
      for (int64_t i = 0; i < N_ && bad.size() < 5; ++i)
        for (int l = 0; l < L_; ++l) {
          int32_t v = c[i * L_ + l];
          if (v < 0 || v >= K_[l]) {
            bad.push_back(i);
            break;
          }
        }
      if (!bad.empty()) {
        Msg os;
        os << "codes out of range [0, codebook_size) in row(s)";
        for (auto i : bad) os << " " << i << " " << sid_repr(c + i * L_, L_);
        os << "; codebook_sizes = (";
        for (int l = 0; l < L_; ++l) os << (l ? ", " : "") << K_[l];
        os << ")";
        fail(os.str());
        return;
      }
    }

    // 2. sort rows (stable: equal SIDs keep construction order)
    order_.resize(N_);
    std::iota(order_.begin(), order_.end(), 0);
    int total_bits = 0;
    std::vector<int> bits(L_);
    for (int l = 0; l < L_; ++l) total_bits += (bits[l] = bits_for(K_[l]));
    if (total_bits <= 64) {
      // LSD radix sort of one uint64 per row: packed codes in the high bits, the row index in the
      // low bits (8 bytes moved per row, cache friendly). Digits of at most 12 bits keep the
      // histogram in L1. Only the code bits are sorted on, and LSD is stable, so equal SIDs keep
      // their construction order. Falls back to (key, index) pairs when both do not fit in 64 bits.
      const int idx_bits = std::max(1, bits_for(N_));
      const int passes = (total_bits + 11) / 12;
      const int width = passes ? (total_bits + passes - 1) / passes : 0;
      std::vector<int64_t> count(size_t(1) << width);
      auto radix = [&](auto& a, auto& b, auto key_of, int base_shift) {
        const uint64_t mask = (uint64_t(1) << width) - 1;
        for (int pass = 0, shift = base_shift; pass < passes; ++pass, shift += width) {
          std::fill(count.begin(), count.end(), 0);
          for (int64_t i = 0; i < N_; ++i) ++count[(key_of(a[i]) >> shift) & mask];
          int64_t sum = 0;
          for (auto& x : count) {
            int64_t t = x;
            x = sum;
            sum += t;
          }
          for (int64_t i = 0; i < N_; ++i) b[count[(key_of(a[i]) >> shift) & mask]++] = a[i];
          a.swap(b);
        }
      };
      auto pack = [&](int64_t i) {
        uint64_t k = 0;
        for (int l = 0; l < L_; ++l) k = (k << bits[l]) | static_cast<uint64_t>(c[i * L_ + l]);
        return k;
      };
      sorted_codes_.resize(N_ * L_);
      sorted_items_.resize(N_);
      auto emit = [&](int64_t s, uint64_t k, int64_t idx) {
        // the sorted keys hold the codes: decode them instead of gathering rows at random
        order_[s] = idx;
        sorted_items_[s] = ids[idx];
        for (int l = L_ - 1; l >= 0; --l) {
          sorted_codes_[s * L_ + l] = static_cast<int32_t>(k & ((uint64_t(1) << bits[l]) - 1));
          k >>= bits[l];
        }
      };
      if (total_bits + idx_bits <= 64) {
        std::vector<uint64_t> a(N_), b(N_);
        for (int64_t i = 0; i < N_; ++i) a[i] = (pack(i) << idx_bits) | static_cast<uint64_t>(i);
        radix(a, b, [](uint64_t v) { return v; }, idx_bits);
        const uint64_t imask = (uint64_t(1) << idx_bits) - 1;
        for (int64_t s = 0; s < N_; ++s) emit(s, a[s] >> idx_bits, static_cast<int64_t>(a[s] & imask));
      } else {
        struct KI {
          uint64_t key;
          int64_t idx;
        };
        std::vector<KI> a(N_), b(N_);
        for (int64_t i = 0; i < N_; ++i) a[i] = {pack(i), i};
        radix(a, b, [](const KI& v) { return v.key; }, 0);
        for (int64_t s = 0; s < N_; ++s) emit(s, a[s].key, a[s].idx);
      }
    } else {
      std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) {
        return std::lexicographical_compare(c + a * L_, c + a * L_ + L_, c + b * L_, c + b * L_ + L_);
      });
      sorted_codes_.resize(N_ * L_);
      sorted_items_.resize(N_);
      for (int64_t s = 0; s < N_; ++s) {
        std::copy(c + order_[s] * L_, c + order_[s] * L_ + L_, sorted_codes_.begin() + s * L_);
        sorted_items_[s] = ids[order_[s]];
      }
    }

    // 3. one pass: new nodes from the first differing position
    n_nodes_.assign(L_ + 1, 0);
    n_nodes_[0] = 1;
    indptr_.assign(L_, {});
    child_codes_.assign(L_, {});
    indptr_[0].push_back(0);
    for (int d = 0; d < L_; ++d) {
      child_codes_[d].reserve(N_);
      if (d + 1 < L_) indptr_[d + 1].reserve(N_ + 1);
    }
    leaf_ptr_.reserve(N_ + 1);
    std::vector<std::pair<int64_t, int64_t>> dups;
    for (int64_t s = 0; s < N_; ++s) {
      const int32_t* row = sorted_codes_.data() + s * L_;
      int f = 0;
      if (s > 0) {
        const int32_t* prev = row - L_;
        while (f < L_ && prev[f] == row[f]) ++f;
      }
      if (f == L_) {  // same SID as the previous row
        if (!allow_duplicates && dups.size() < 5) dups.emplace_back(order_[s - 1], order_[s]);
        continue;
      }
      for (int d = f; d < L_; ++d) {
        n_nodes_[d + 1]++;
        child_codes_[d].push_back(row[d]);
        if (d + 1 < L_) indptr_[d + 1].push_back(n_nodes_[d + 2]);
      }
      leaf_ptr_.push_back(s);
    }
    if (!dups.empty()) {
      Msg os;
      os << "duplicate SIDs (pass allow_duplicates=True to keep them):";
      for (auto& p : dups) os << " rows " << p.first << " and " << p.second << " share " << sid_repr(c + p.second * L_, L_) << ";";
      fail(os.str());
      return;
    }
    for (int d = 0; d < L_; ++d) indptr_[d].push_back(n_nodes_[d + 1]);
    leaf_ptr_.push_back(N_);
    max_branch_.assign(L_, 0);
    for (int d = 0; d < L_; ++d)
      for (int64_t p = 0; p < n_nodes_[d]; ++p)
        max_branch_[d] = std::max<int64_t>(max_branch_[d], indptr_[d][p + 1] - indptr_[d][p]);
  }

  int64_t num_items() const { return N_; }
  int num_levels() const { return L_; }
  std::vector<int64_t> codebook_sizes() const { return K_; }
  int64_t num_nodes(int depth) const {
    if (!error_.empty() || depth < 0 || depth > L_) return -1;  // the Python wrapper checks first
    return n_nodes_[depth];
  }
  int64_t max_branch(int depth) const {
    if (!error_.empty() || depth < 0 || depth >= L_) return -1;
    return max_branch_[depth];
  }

  // child of node p (depth d) with code c, or -1
  int64_t child(int d, int64_t p, int32_t code) const {
    const auto& cc = child_codes_[d];
    auto b = cc.begin() + indptr_[d][p], e = cc.begin() + indptr_[d][p + 1];
    auto it = std::lower_bound(b, e, code);
    return (it != e && *it == code) ? (it - cc.begin()) : -1;
  }

  // node of a prefix, or -1 when absent
  int64_t walk(const int32_t* prefix, int n) const {
    int64_t node = 0;
    for (int d = 0; d < n && node >= 0; ++d) node = child(d, node, prefix[d]);
    return node;
  }

  // codes that may follow the prefix (sorted), or None when the prefix is not in the trie
  py::object allowed(const std::vector<int64_t>& prefix) const {
    int n = static_cast<int>(prefix.size());
    if (!error_.empty() || n > L_) return py::none();
    int64_t node = 0;
    for (int d = 0; d < n; ++d) {
      int64_t code = prefix[d];
      node = (code < 0 || code >= K_[d]) ? -1 : child(d, node, static_cast<int32_t>(code));
      if (node < 0) return py::none();
    }
    if (n == L_) return py::array_t<int32_t>(py::ssize_t(0));
    const auto& cc = child_codes_[n];
    int64_t b = indptr_[n][node], e = indptr_[n][node + 1];
    py::array_t<int32_t> out(e - b);
    std::copy(cc.begin() + b, cc.begin() + e, out.mutable_data());
    return std::move(out);
  }

  // leaf id per query row, -1 when absent; None for a query that is not [M, L] (the wrapper checks first)
  py::object lookup(py::array_t<int32_t, py::array::c_style> q) const {
    if (!error_.empty() || q.ndim() != 2 || q.shape(1) != L_) return py::none();
    int64_t M = q.shape(0);
    py::array_t<int64_t> out(M);
    const int32_t* d = q.data();
    int64_t* o = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      for (int64_t i = 0; i < M; ++i) {
        const int32_t* row = d + i * L_;
        bool ok = true;
        for (int l = 0; l < L_; ++l) ok = ok && row[l] >= 0 && row[l] < K_[l];
        o[i] = ok ? walk(row, L_) : -1;
      }
    }
    return std::move(out);
  }

  // item ids of a leaf, or None for a leaf id out of range
  py::object leaf_items(int64_t leaf) const {
    if (!error_.empty() || leaf < 0 || leaf >= n_nodes_[L_]) return py::none();
    int64_t b = leaf_ptr_[leaf], e = leaf_ptr_[leaf + 1];
    py::array_t<int64_t> out(e - b);
    std::copy(sorted_items_.begin() + b, sorted_items_.begin() + e, out.mutable_data());
    return std::move(out);
  }

  // exports (copies into numpy)
  // per depth d in 0..L-1 (an empty array for any other d)
  py::array_t<int64_t> indptr(int d) const { return to_np(d >= 0 && d < int(indptr_.size()) ? indptr_[d] : no_i64_); }
  py::array_t<int32_t> child_codes(int d) const {
    return to_np(d >= 0 && d < int(child_codes_.size()) ? child_codes_[d] : no_i32_);
  }
  // "" when the constructor succeeded, else why it did not (the wrapper raises ValueError with it)
  const std::string& error() const { return error_; }
  py::array_t<int64_t> leaf_ptr() const { return to_np(leaf_ptr_); }
  py::array_t<int64_t> sorted_items() const { return to_np(sorted_items_); }
  py::array_t<int64_t> order() const { return to_np(order_); }

 private:
  template <typename T>
  static py::array_t<T> to_np(const std::vector<T>& v) {
    py::array_t<T> out(v.size());
    std::copy(v.begin(), v.end(), out.mutable_data());
    return out;
  }
  // the constructor's way out: no C++ exception crosses the binding (see the file comment)
  void fail(const std::string& why) { error_ = why.empty() ? "invalid trie input" : why; }

  int64_t N_ = 0;
  int L_ = 0;
  std::vector<int64_t> K_;
  std::vector<int64_t> order_;
  std::vector<int32_t> sorted_codes_;
  std::vector<int64_t> sorted_items_;
  std::vector<int64_t> n_nodes_;
  std::vector<std::vector<int64_t>> indptr_;
  std::vector<std::vector<int32_t>> child_codes_;
  std::vector<int64_t> leaf_ptr_;
  std::vector<int64_t> max_branch_;
  std::string error_;
  static inline const std::vector<int64_t> no_i64_{};
  static inline const std::vector<int32_t> no_i32_{};
};

PYBIND11_MODULE(_trie, m) {
  m.doc() = "Static Semantic-ID trie (see genrec_fast.trie.SIDTrie for the public API)";
  py::class_<Trie>(m, "Trie")
      .def(py::init<const py::array_t<int32_t, py::array::c_style>&, const std::vector<int64_t>&,
                    const py::array_t<int64_t, py::array::c_style>&, bool>(),
           py::arg("codes"), py::arg("codebook_sizes"), py::arg("item_ids"), py::arg("allow_duplicates"),
           py::call_guard<py::gil_scoped_release>())
      .def("num_items", &Trie::num_items)
      .def("num_levels", &Trie::num_levels)
      .def("codebook_sizes", &Trie::codebook_sizes)
      .def("num_nodes", &Trie::num_nodes, py::arg("depth"))
      .def("max_branch", &Trie::max_branch, py::arg("depth"))
      .def("error", &Trie::error)
      .def("allowed", &Trie::allowed, py::arg("prefix"))
      .def("lookup", &Trie::lookup, py::arg("codes"))
      .def("leaf_items", &Trie::leaf_items, py::arg("leaf"))
      .def("indptr", &Trie::indptr, py::arg("depth"))
      .def("child_codes", &Trie::child_codes, py::arg("depth"))
      .def("leaf_ptr", &Trie::leaf_ptr)
      .def("sorted_items", &Trie::sorted_items)
      .def("order", &Trie::order);
}
