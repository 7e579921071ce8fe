"""The launch plans of the CUDA rms_norm and layer_norm backwards, checked on the host (no GPU needed).

A small driver includes each kernel file, asks its `plan_backward_for<VEC>` for many (rows, hidden size) pairs and
prints the plans; the checks are what the kernels rely on for a correct result: every row falls in a row group of
the grid, every vector of a row in a thread's share, one dW partial row per group, blocks within the kernel's thread
bound, and the fused path taken exactly up to its documented width. The kernels' numbers are checked on a GPU
(tests/cuda/test_cuda_kernels_gpu.py, tests/conformance).
"""

from __future__ import annotations

import subprocess

import pytest
from liger_backends.cuda import _extension
from test_cuda_build import TORCH_NVCC_FLAGS, _nvcc_or_skip

CSRC = _extension.CSRC
ROWS = (1, 3, 7, 64, 127, 1000, 4096, 8191, 65536)
HIDDEN = (8, 64, 96, 1000, 1023, 1024, 2048, 4095, 4096, 8192, 8200, 16384, 65536)
MAX_THREADS = {8: 1024, 4: 1024, 1: 256}  # the fused path's block bound, by elements per vector
CACHED = {8: 1, 4: 2, 1: 4}  # vectors a thread keeps: 8 elements (at most 4 vectors)
WIDE_CACHED, WIDE_THREADS = 4, 512  # rms_norm's fused path for rows wider than the narrow one
CHUNK_THREADS, CHUNK_CACHED = 256, 4

DRIVER = """
#include <cstdio>
#include "{source}"
using namespace liger_cuda;

template <int VEC>
void show(long long rows, long long cols) {{
  const auto p = plan_backward_for<VEC>(rows, cols);
  std::printf("%d %lld %lld %d %d %d %u %u %lld %lld %lld %lld\\n", VEC, rows, cols, p.fused ? 1 : 0, {cached},
              {wide}, p.block.x, p.block.y, (long long)p.grid_x, (long long)p.grid_y, (long long)p.rows_per_group,
              (long long)p.partial_rows);
}}

int main() {{
  for (long long rows : {{{rows}}})
    for (long long cols : {{{hidden}}}) {{
      if (cols % 8 == 0) show<8>(rows, cols);
      if (cols % 4 == 0) show<4>(rows, cols);
      show<1>(rows, cols);
    }}
  return 0;
}}
"""


def plans(source: str, tmp_path) -> list[dict]:
    nvcc = _nvcc_or_skip()
    if source == "layer_norm.cu":  # one fused kernel; its vectors a thread are backward_cached<VEC>()
        cached, wide = "p.fused ? backward_cached<VEC>() : 0", "0"
    else:
        cached, wide = "p.cached", "p.wide ? 1 : 0"
    driver = tmp_path / f"plan_{source}"
    driver.write_text(
        DRIVER.format(
            source=source,
            cached=cached,
            wide=wide,
            rows=", ".join(map(str, ROWS)),
            hidden=", ".join(map(str, HIDDEN)),
        )
    )
    binary = tmp_path / f"plan_{source}.bin"
    command = [nvcc, "-std=c++17", "-O1", "-gencode=arch=compute_90,code=sm_90", *TORCH_NVCC_FLAGS, f"-I{CSRC}"]
    built = subprocess.run([*command, str(driver), "-o", str(binary)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    ran = subprocess.run([str(binary)], capture_output=True, text=True, check=True, timeout=60)
    keys = ("vec", "rows", "cols", "fused", "cached", "wide", "bx", "by", "grid_x", "grid_y", "rpg", "partial")
    return [dict(zip(keys, map(int, line.split()))) for line in ran.stdout.splitlines()]


def check_fused(p: dict, max_threads: int, cached: int) -> None:
    vectors = p["cols"] // p["vec"]
    assert p["cached"] == cached, p
    assert p["bx"] % 32 == 0 and p["bx"] * p["by"] <= max_threads, p
    assert p["by"] == 1 or p["bx"] == 32, p  # several rows a block only when a warp holds a row
    assert p["bx"] * cached >= vectors, p  # every vector of a row is some thread's
    groups = p["grid_x"] * p["by"]
    assert p["grid_y"] == 1 and p["rpg"] >= 1, p
    assert groups * p["rpg"] >= p["rows"], p  # every row is some group's
    assert (p["grid_x"] - 1) * p["by"] * p["rpg"] < p["rows"], p  # no block starts past the last row
    assert p["partial"] == groups, p  # one dW partial row per group, each written by its group


def check_chunked(p: dict) -> None:
    vectors = p["cols"] // p["vec"]
    assert p["bx"] == CHUNK_THREADS and p["by"] == 1, p
    assert p["grid_y"] * CHUNK_THREADS * CHUNK_CACHED >= vectors, p  # column chunks cover the row
    assert p["grid_x"] * p["rpg"] >= p["rows"] and (p["grid_x"] - 1) * p["rpg"] < p["rows"], p
    assert p["partial"] == p["grid_x"], p


@pytest.mark.parametrize("source", ["layer_norm.cu", "rms_norm.cu"])
def test_backward_plans_cover_every_row_and_vector(source, tmp_path):
    found = plans(source, tmp_path)
    assert len(found) == len(ROWS) * sum(1 + (h % 8 == 0) + (h % 4 == 0) for h in HIDDEN)
    for p in found:
        vectors = p["cols"] // p["vec"]
        narrow = vectors <= MAX_THREADS[p["vec"]] * CACHED[p["vec"]]
        wide = source == "rms_norm.cu" and not narrow and vectors <= WIDE_THREADS * WIDE_CACHED
        assert p["fused"] == (narrow or wide), p
        assert p["wide"] == wide, p
        if narrow:
            check_fused(p, MAX_THREADS[p["vec"]], CACHED[p["vec"]])
        elif wide:
            check_fused(p, WIDE_THREADS, WIDE_CACHED)
        else:
            check_chunked(p)


def test_the_reference_shape_runs_one_vector_a_thread_on_512_threads(tmp_path):
    # Llama's (8192 tokens, 4096) in bf16: 512 vectors of 8, one a thread; fp32 takes two vectors a thread.
    found = {(p["vec"], p["rows"], p["cols"]): p for p in plans("layer_norm.cu", tmp_path)}
    bf16 = found[(8, 8191, 4096)]
    assert bf16["fused"] and (bf16["bx"], bf16["by"], bf16["cached"]) == (512, 1, 1)
    fp32 = found[(4, 8191, 8192)]  # fused up to 8192 wide in fp32 too
    assert fp32["fused"] and (fp32["bx"], fp32["cached"]) == (1024, 2)
    assert not found[(1, 8191, 4095)]["fused"]  # an odd hidden size past 1024 takes the chunked path
