"""The CUDA kernels are plain CUDA: nvcc alone compiles every dtype/vector-width instantiation
(for sm_90 here; setup.py builds sm_80 and sm_90). Runs wherever nvcc exists, GPU or not."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "ops" / "csrc"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


def ptxas_report(source: Path, out: Path) -> str:
    command = ["nvcc", "-c", "-std=c++17", "-O3", "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v",
               str(source), "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def local_memory(report: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Kernels with a register array in local memory (a stack frame beyond the 8-byte spill slots),
    and kernels spilling more than 16 bytes. ptxas itself spills a few bytes in some instances to
    land on an occupancy step (48 or 64 registers per thread): its trade, allowed while that small."""
    frames = re.findall(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                        r"(\d+) bytes spill loads", report)
    frames = [(name, int(frame), max(int(stores), int(loads))) for name, frame, stores, loads in frames]
    local_arrays = [name for name, frame, spilled in frames if frame > -(-spilled // 8) * 8]
    return local_arrays, [(name, spilled) for name, _, spilled in frames if spilled > 16]


@needs_nvcc
def test_kernels_compile_with_nvcc_alone_and_keep_their_arrays_in_registers(tmp_path):
    report = ptxas_report(CSRC / "dcnv3_cuda_instantiate.cu", tmp_path / "kernels.o")
    assert "forward_kernel" in report and "backward_kernel" in report
    assert report.count("Function properties for") > 100  # every instantiation reported
    assert local_memory(report) == ([], [])


@needs_nvcc
def test_a_register_array_indexed_at_run_time_is_caught(tmp_path):
    probe = tmp_path / "probe.cu"
    probe.write_text("__global__ void probe(float* out, const int* index) {\n"
                     "  float a[64];\n"
                     "  for (int i = 0; i < 64; ++i) a[i] = out[i + blockIdx.x];\n"
                     "  a[index[0]] += 1;\n"
                     "  out[threadIdx.x] = a[index[threadIdx.x]];\n"
                     "}\n")
    assert local_memory(ptxas_report(probe, tmp_path / "probe.o"))[0] == ["_Z5probePfPKi"]
