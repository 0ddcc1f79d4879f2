// Bindings for the host-side logic of the Hopper FP8 GEMM (common/gemm_sched.h): the tile
// heuristic and the persistent scheduler, exposed so that tests check them on the CPU with
// the very functions the sm90 kernel runs.
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "common/gemm_sched.h"
#ifdef LEANKERNELS_WITH_SM90
#include "cuda/sm90_fp8_gemm.cuh"
#endif

namespace lk::bind {
namespace {

sched::GemmLayoutKind parse_layout(const std::string& s) {
  if (s == "dense") return sched::GemmLayoutKind::dense;
  if (s == "contiguous") return sched::GemmLayoutKind::contiguous;
  if (s == "masked") return sched::GemmLayoutKind::masked;
  throw ArgError("leankernels: layout must be 'dense', 'contiguous' or 'masked', got '" + s + "'");
}

}  // namespace

void register_gemm_sched(py::module_& m) {
  m.def(
      "sm90_gemm_config",
      [](int64_t M, int64_t N, int64_t K, int64_t num_groups, int num_sms, const std::string& layout) {
        const auto kind = parse_layout(layout);
        LK_CHECK(M >= 0 && N > 0 && K > 0, "sm90_gemm_config: M >= 0, N > 0 and K > 0 are required");
        LK_CHECK(num_groups >= 1 && num_sms >= 1, "sm90_gemm_config: num_groups and num_sms must be >= 1");
        // bounds M, N, num_groups so that the tile counts below cannot overflow
        sched::sm90_check_sizes("sm90_gemm_config", kind, M, N, num_groups);
        const sched::Sm90GemmConfig c = sched::sm90_pick_config(kind, M, N, K, num_groups, num_sms);
        const int64_t num_n = sched::cdiv64(N, c.block_n);
        py::dict d;
        d["block_m"] = c.block_m;
        d["block_n"] = c.block_n;
        d["num_math_wg"] = c.num_math_wg;
        d["wg_split_n"] = c.wg_split_n;
        d["band"] = sched::sm90_band_width(num_sms, c.block_m, c.block_n, num_n);
        d["grid"] = sched::sm90_grid(kind, M, N, num_groups, c, num_sms);
        d["tiles_bound"] = sched::sm90_mblocks_bound(kind, M, num_groups, c.block_m) * num_n;
        return d;
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("num_groups"), py::arg("num_sms"),
      py::arg("layout") = "dense");

  m.def(
      "sm90_configs",
      [] {
        py::list out;
        for (int i = 0; i < sched::kSm90NumConfigs; ++i) {
          const sched::Sm90GemmConfig c = sched::sm90_config(i);
          out.append(py::make_tuple(c.block_m, c.block_n, c.num_math_wg, c.wg_split_n));
        }
        return out;
      });

  // The tiles every persistent CTA runs, in order, as the kernel derives them:
  // (sm, group, m_block, n_block, row0, rows) with row0 the first row in the a / out 2D view
  // (masked: [E * M, N]) and rows the rows the tile writes. group_info holds the raw device
  // values: contiguous offs (cumulative end offsets), masked masked_m; ignored for dense.
  m.def(
      "sm90_schedule",
      [](const std::string& layout, int64_t M, int64_t N, int64_t K, const std::vector<int64_t>& group_info,
         int num_sms, int block_m, int block_n) {
        const auto kind = parse_layout(layout);
        (void)K;
        LK_CHECK(M >= 0 && N > 0 && M < (int64_t(1) << 30) && N < (int64_t(1) << 30),
                 "sm90_schedule: bad M or N");
        LK_CHECK(num_sms >= 1 && block_m > 0 && block_n > 0, "sm90_schedule: num_sms, block_m, block_n > 0");
        const int G = kind == sched::GemmLayoutKind::dense ? 1 : int(group_info.size());
        LK_CHECK(G >= 1, "sm90_schedule: group_info must not be empty for grouped layouts");
        sched::sm90_check_sizes("sm90_schedule", kind, M, N, G);
        std::vector<int> ends(G), prefix(G + 1, 0);
        for (int g = 0; g < G; ++g) {
          int64_t raw = kind == sched::GemmLayoutKind::dense ? 0 : group_info[g];
          LK_CHECK(raw >= INT32_MIN && raw <= INT32_MAX, "sm90_schedule: group_info must fit int32");
          ends[g] = int(sched::group_end(kind, M, int32_t(raw)));
          // the kernel's group table keeps the running maximum of the contiguous ends
          if (kind == sched::GemmLayoutKind::contiguous && g > 0 && ends[g] < ends[g - 1]) ends[g] = ends[g - 1];
        }
        auto rows_of = [&](int g) { return sched::group_rows(kind, M, g, ends[g], g ? ends[g - 1] : 0); };
        // m-block prefix in int64, checked before it narrows to the kernel's int table (an int
        // running sum overflowed for many large groups)
        int64_t run = 0;
        for (int g = 0; g < G; ++g) {
          run += sched::mblocks_of(rows_of(g), block_m);
          LK_CHECK(run < INT32_MAX, "sm90_schedule: too many tiles");
          prefix[g + 1] = int(run);
        }
        const int num_n = int(sched::cdiv64(N, block_n));
        const int band = sched::sm90_band_width(num_sms, block_m, block_n, num_n);
        const sched::Sm90GemmConfig c{block_m, block_n, 1, 1};
        const int grid = sched::sm90_grid(kind, M, N, G, c, num_sms);
        const int64_t total = int64_t(prefix[G]) * num_n;
        LK_CHECK(total < INT32_MAX, "sm90_schedule: too many tiles");
        py::list out;
        for (int sm = 0; sm < grid; ++sm) {
          for (int t = sm; t < total; t += grid) {
            const sched::TileCoord tc = sched::tile_coord(t, prefix.data(), G, num_n, band);
            const sched::GroupRows r = rows_of(tc.group);
            const int64_t m_local = r.begin + int64_t(tc.m_block) * block_m;
            int64_t rows = r.end - m_local;
            rows = rows > block_m ? block_m : rows;
            out.append(py::make_tuple(sm, tc.group, tc.m_block, tc.n_block, r.base + m_local, rows));
          }
        }
        return out;
      },
      py::arg("layout"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_info"), py::arg("num_sms"),
      py::arg("block_m"), py::arg("block_n"));

  // The raw Hopper kernel, for its own GPU tests (tests/test_gemm_sm90.py); the public GEMM ops
  // reach it through the GEMM family's dispatch. Same arguments as lk::cuda::sm90::fp8_gemm
  // (config_index -1: heuristic; i: force sched::sm90_config(i)).
  m.def("sm90_available", [] {
#ifdef LEANKERNELS_WITH_SM90
    return true;
#else
    return false;
#endif
  });
  m.def(
      "sm90_fp8_gemm_supported",
      [](const std::string& layout, int64_t M, int64_t N, int64_t K, bool out_fp32, uintptr_t a, uintptr_t b,
         uintptr_t out, int64_t num_groups) {
        const auto kind = parse_layout(layout);
#ifdef LEANKERNELS_WITH_SM90
        return cuda::sm90::fp8_gemm_supported(cuda::sm90::GemmLayout(int(kind)), M, N, K, out_fp32, ptr<const void>(a),
                                              ptr<const void>(b), ptr<const void>(out), num_groups);
#else
        (void)kind, (void)M, (void)N, (void)K, (void)out_fp32, (void)a, (void)b, (void)out, (void)num_groups;
        return false;
#endif
      });
  m.def(
      "sm90_fp8_gemm",
      [](const std::string& layout, uintptr_t a, uintptr_t a_scale, uintptr_t b, uintptr_t b_scale, uintptr_t out,
         bool out_fp32, int64_t M, int64_t N, int64_t K, int64_t num_groups, uintptr_t group_info, int device,
         uintptr_t stream, int config_index) {
        const auto kind = parse_layout(layout);
#ifdef LEANKERNELS_WITH_SM90
        cuda::sm90::fp8_gemm(cuda::sm90::GemmLayout(int(kind)), ptr<const uint8_t>(a), ptr<const float>(a_scale),
                             ptr<const uint8_t>(b), ptr<const float>(b_scale), ptr<void>(out), out_fp32, M, N, K,
                             num_groups, ptr<const int32_t>(group_info), device, stream_ptr(stream), config_index);
#else
        (void)kind, (void)a, (void)a_scale, (void)b, (void)b_scale, (void)out, (void)out_fp32, (void)M, (void)N;
        (void)K, (void)num_groups, (void)group_info, (void)device, (void)stream, (void)config_index;
        no_cuda("sm90_fp8_gemm");
#endif
      },
      py::arg("layout"), py::arg("a"), py::arg("a_scale"), py::arg("b"), py::arg("b_scale"), py::arg("out"),
      py::arg("out_fp32"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("num_groups"), py::arg("group_info"),
      py::arg("device"), py::arg("stream"), py::arg("config_index") = -1, py::call_guard<py::gil_scoped_release>());
}

}  // namespace lk::bind
