"""Times the DCNv3 core on InternImage's shapes against the reference and the memory floor.

    python -m internimage.ops.bench [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                    [--variants t,h] [--batch N] [--repeats R] [--json PATH]
                                    [--no-reference] [--no-dcnv4]
    python -m internimage.ops.bench --candidates all [--dtypes bfloat16,float16] [--json PATH]

Per shape (every DCNv3 layer shape of the four stages at 224², N=64 on GPU, N=8 on CPU): forward
and backward medians of ours, of the reference and (GPU, if the PyPI ``DCNv4`` package imports)
of DCNv4; the speed-up; the bytes the op must move at least (forward: value + offset + mask +
output; backward: value + offset + mask + grad_output + the three gradients), the achieved GB/s,
the floor (those bytes over the measured copy bandwidth) and ours/floor. Numbers, not a test.

``--candidates all`` (or a comma list of names) times every CUDA kernel candidate of each
direction (ops/candidates.py) on every shape and dtype (default bf16 and fp16), DCNv4 beside them,
and prints per shape the fastest and its ratio to the floor: the measurement that sets
``ops/candidate_table.py``. Without a GPU it runs every candidate once on a tiny shape through
the CUDA emulation (ops/emulation.py), so CI exercises the same code path.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import candidates, extension
from .dcnv3 import dcnv3_core_packed, pack_offset_mask
from .reference import dcnv3_core_reference

# docs/model.md §1: stage-1 channels and groups per stage; stages halve the side from 56 at 224².
VARIANTS = {"t": (64, (4, 8, 16, 32)), "h": (320, (10, 20, 40, 80))}
PARAMS = (3, 3, 1, 1, 1, 1, 1, 1)  # kernel, stride, pad, dilation (h, w each)


@dataclass(frozen=True)
class BenchShape:
    name: str
    batch: int
    side: int
    groups: int
    depth: int

    @property
    def channels(self) -> int:
        return self.groups * self.depth


@dataclass
class Row:
    shape: BenchShape
    ms: dict = field(default_factory=dict)  # "ours_fwd", "ref_bwd", "dcnv4_fwd", ...
    bytes_fwd: int = 0
    bytes_bwd: int = 0
    notes: list = field(default_factory=list)


def shapes_for(variants: list[str], batch: int) -> list[BenchShape]:
    out = []
    for variant in variants:
        channels, groups = VARIANTS[variant]
        for stage, g in enumerate(groups):
            out.append(BenchShape(f"{variant.upper()}-stage{stage + 1}", batch, 56 >> stage, g,
                                  (channels << stage) // g))
    return out


def make_inputs(shape: BenchShape, dtype: torch.dtype, device: str):
    n, s, g = shape.batch, shape.side, shape.groups
    value = torch.randn(n, s, s, shape.channels, device=device, dtype=dtype)
    offset = torch.randn(n, s, s, g * 18, device=device, dtype=dtype)
    mask = torch.randn(n, s, s, g, 9, device=device, dtype=torch.float32).softmax(-1)
    return value, offset, mask.reshape(n, s, s, g * 9).to(dtype)


def median_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn; CUDA events around each call on the GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str) -> float:
    """Device-memory bandwidth as a large copy moves it (bytes read + bytes written)."""
    numel = (1 << 28) if device == "cuda" else (1 << 26)  # 1 GiB / 256 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats=10)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _dcnv4_function():
    try:
        from DCNv4.functions.dcnv4_func import DCNv4Function
    except Exception as error:  # not installed, or built for another torch
        return None, f"{type(error).__name__}: {error}"
    return DCNv4Function, None


def _dcnv4_pack(offset: torch.Tensor, mask: torch.Tensor, groups: int) -> torch.Tensor:
    """DCNv4's offset_mask: ours (per group its 18 offsets then its 9 mask values, here already
    softmaxed), the row padded to a multiple of 8 channels."""
    packed = pack_offset_mask(offset, mask, groups)
    pad = -packed.shape[-1] % 8
    return torch.nn.functional.pad(packed, (0, pad)).contiguous()


def bench_shape(shape: BenchShape, dtype, device, repeats, with_reference, dcnv4) -> Row:
    value, offset, mask = make_inputs(shape, dtype, device)
    grad = torch.randn(shape.batch, shape.side, shape.side, shape.channels, device=device, dtype=dtype)
    element = value.element_size()
    row = Row(shape)
    row.bytes_fwd = (value.numel() + offset.numel() + mask.numel() + grad.numel()) * element
    row.bytes_bwd = row.bytes_fwd + (value.numel() + offset.numel() + mask.numel()) * element
    params = (*PARAMS, shape.groups, 1.0, False, False)  # offset_scale, remove_center, softmax_mask

    backward_op = torch.ops.internimage.dcnv3_core_backward
    offset_mask = pack_offset_mask(offset, mask, shape.groups)  # as the model's one GEMM outputs them
    row.ms["ours_fwd"] = median_ms(lambda: dcnv3_core_packed(value, offset_mask, groups=shape.groups), device,
                                   repeats)
    row.ms["ours_bwd"] = median_ms(lambda: backward_op(grad, value, offset_mask, *params), device, repeats)

    if with_reference:
        leaves = [t.clone().requires_grad_(True) for t in (value, offset, mask)]
        with torch.no_grad():
            row.ms["ref_fwd"] = median_ms(lambda: dcnv3_core_reference(value, offset, mask, groups=shape.groups),
                                          device, repeats)
        out = dcnv3_core_reference(*leaves, groups=shape.groups)
        row.ms["ref_bwd"] = median_ms(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True),
                                      device, repeats)
        del out
    if dcnv4 is not None:
        row.ms.update(time_dcnv4(dcnv4, shape, value, offset, mask, grad, device, repeats, row.notes))
    return row


def time_dcnv4(dcnv4, shape: BenchShape, value, offset, mask, grad, device, repeats, notes: list) -> dict:
    """DCNv4's forward and backward medians (ms) on the same inputs, offsets and mask packed its way."""
    ms = {}
    packed = _dcnv4_pack(offset, mask, shape.groups)
    args = (3, 3, 1, 1, 1, 1, 1, 1, shape.groups, shape.depth, 1.0, shape.batch, 0)
    with torch.no_grad():
        ms["dcnv4_fwd"] = median_ms(lambda: dcnv4.apply(value, packed, *args), device, repeats)
    leaves = [value.clone().requires_grad_(True), packed.clone().requires_grad_(True)]
    out = dcnv4.apply(*leaves, *args)
    try:
        ms["dcnv4_bwd"] = median_ms(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True),
                                    device, repeats)
    except RuntimeError as error:  # DCNv4 1.0.0.post2 has no bf16 backward
        ms["dcnv4_bwd"] = float("nan")
        notes.append(f"dcnv4 backward: {error}")
    return ms


# ---- --candidates: every CUDA kernel candidate, side by side ---------------------------------------

# Without a GPU the candidates run through the CUDA emulation, whose speed means nothing: one tiny
# shape (two groups of InternImage's 16 channels), once, exercises every candidate's code path.
EMULATED_SHAPES = [BenchShape("tiny", batch=1, side=8, groups=2, depth=16)]


def pick_candidates(spec: str) -> dict[str, tuple[str, ...]]:
    """``all`` or a comma list of names → the candidates to time per direction."""
    if spec == "all":
        return dict(candidates.CANDIDATES)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if not any(n in c for c in candidates.CANDIDATES.values())]
    if unknown:
        raise SystemExit(f"--candidates: unknown {unknown}; forward: {candidates.FORWARD}, "
                         f"backward: {candidates.BACKWARD}")
    return {d: tuple(n for n in names if n in c) for d, c in candidates.CANDIDATES.items()}


def time_candidates(kernels, shapes: list[BenchShape], dtypes: list[torch.dtype], device: str, repeats: int,
                    chosen: dict[str, tuple[str, ...]], bandwidth_gbs: float, dcnv4=None,
                    warmup: int = 2) -> list[dict]:
    """Per shape and dtype: each candidate's forward and backward median (ms) through the extension
    module ``kernels`` (the CUDA one, or the emulated one on the CPU), called as the model calls it
    (mask logits, softmax inside the op), the largest difference of its result from the first
    candidate's, the floor, and the fastest per direction with its ratio to the floor. DCNv4, when
    given, gets the softmaxed mask its own way."""
    results = []
    for shape in shapes:
        for dtype in dtypes:
            value, offset, mask = make_inputs(shape, dtype, device)
            grad = torch.randn(shape.batch, shape.side, shape.side, shape.channels, device=device, dtype=dtype)
            # As the model calls it: mask logits, softmaxed inside the op.
            logits = torch.randn(shape.batch, shape.side, shape.side, shape.groups * 9, device=device, dtype=dtype)
            params = (*PARAMS, shape.groups, 1.0, False, True)  # offset_scale, remove_center, softmax_mask
            element = value.element_size()
            bytes_fwd = (value.numel() + offset.numel() + mask.numel() + grad.numel()) * element
            bytes_bwd = bytes_fwd + (value.numel() + offset.numel() + mask.numel()) * element
            floor = {"forward": bytes_fwd / bandwidth_gbs / 1e6, "backward": bytes_bwd / bandwidth_gbs / 1e6}
            offset_mask = pack_offset_mask(offset, logits, shape.groups)
            calls = {"forward": lambda name: kernels.forward(value, offset_mask, *params, name),
                     "backward": lambda name: kernels.backward(grad, value, offset_mask, *params, name)}
            entry = {**asdict(shape), "dtype": str(dtype).removeprefix("torch."), "floor_ms": floor,
                     "class": candidates.shape_class(shape.side, shape.side), "ms": {}, "max_abs_diff": {},
                     "fastest": {}, "notes": []}
            for direction, names in chosen.items():
                first = None
                for name in names:
                    result = calls[direction](name)
                    result = result if isinstance(result, (list, tuple)) else [result]
                    first = first or result
                    entry["max_abs_diff"][f"{direction}/{name}"] = max(
                        (a.double() - b.double()).abs().max().item() for a, b in zip(result, first))
                    entry["ms"][f"{direction}/{name}"] = median_ms(lambda: calls[direction](name), device, repeats,
                                                                   warmup)
                if names:
                    best = min(names, key=lambda n: entry["ms"][f"{direction}/{n}"])
                    best_ms = entry["ms"][f"{direction}/{best}"]
                    entry["fastest"][direction] = {"candidate": best, "ms": best_ms,
                                                   "over_floor": best_ms / floor[direction]}
            if dcnv4 is not None:
                entry["ms"].update(time_dcnv4(dcnv4, shape, value, offset, mask, grad, device, repeats,
                                              entry["notes"]))
            results.append(entry)
            print(f"done {shape.name} {entry['dtype']}", flush=True)
    return results


def format_candidates(results: list[dict]) -> str:
    lines = []
    for r in results:
        timings = "  ".join(f"{k}={v:.3f}" for k, v in r["ms"].items())
        fastest = "; ".join(f"{d}: {f['candidate']} {f['ms']:.3f} ms = {f['over_floor']:.1f}x floor"
                            for d, f in r["fastest"].items())
        lines.append(f"{r['name']:<10} {r['dtype']:<9} ({r['class']}) fastest {fastest}\n    {timings}")
    return "\n".join(lines)


def run_candidates(args, device: str) -> list[dict]:
    chosen = pick_candidates(args.candidates)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    if device == "cuda":
        kernels = extension.kernels_for(torch.device("cuda"))
        if kernels is None:
            raise SystemExit(f"no compiled DCNv3 CUDA kernel: {extension.load_error('cuda')}")
        shapes, repeats = shapes_for(args.variants.split(","), args.batch or 64), args.repeats or 50
        dcnv4, dcnv4_error = (None, "skipped") if args.no_dcnv4 else _dcnv4_function()
        warmup = 2
    else:
        from .emulation import load_emulated_kernels
        kernels, shapes, repeats, warmup = load_emulated_kernels(), EMULATED_SHAPES, 1, 0
        dcnv4, dcnv4_error = None, "no GPU"
    bandwidth = copy_bandwidth_gbs(device)
    results = time_candidates(kernels, shapes, dtypes, device, repeats, chosen, bandwidth, dcnv4, warmup)
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU (CUDA emulation)",
           "torch": torch.__version__, "copy_bandwidth_gbs": bandwidth, "repeats": repeats,
           "dcnv4": dcnv4_error or "timed", "candidates": chosen, "table": candidates.TABLE}
    _report(env, format_candidates(results), args.json, {"candidates": results})
    return results


def _report(env: dict, table: str, json_path: str | None, payload: dict) -> None:
    """Prints the environment and the table; saves both as JSON when ``json_path`` is given."""
    print(f"# {env}")
    print(table)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"environment": env, **payload}, handle, indent=1)


def summarise(row: Row, bandwidth_gbs: float) -> dict:
    ms = row.ms
    floor_fwd = row.bytes_fwd / bandwidth_gbs / 1e6
    floor_bwd = row.bytes_bwd / bandwidth_gbs / 1e6
    out = {**asdict(row.shape), "ms": ms, "bytes_fwd": row.bytes_fwd, "bytes_bwd": row.bytes_bwd,
           "floor_fwd_ms": floor_fwd, "floor_bwd_ms": floor_bwd,
           "ours_fwd_gbs": row.bytes_fwd / ms["ours_fwd"] / 1e6, "ours_bwd_gbs": row.bytes_bwd / ms["ours_bwd"] / 1e6,
           "ours_over_floor_fwd": ms["ours_fwd"] / floor_fwd, "ours_over_floor_bwd": ms["ours_bwd"] / floor_bwd,
           "notes": row.notes}
    for other in ("ref", "dcnv4"):
        if f"{other}_fwd" in ms:
            out[f"speedup_vs_{other}_fwd"] = ms[f"{other}_fwd"] / ms["ours_fwd"]
            out[f"speedup_vs_{other}_bwd"] = ms[f"{other}_bwd"] / ms["ours_bwd"]
            out[f"speedup_vs_{other}_fwd_bwd"] = ((ms[f"{other}_fwd"] + ms[f"{other}_bwd"]) /
                                                 (ms["ours_fwd"] + ms["ours_bwd"]))
    return out


def format_table(results: list[dict]) -> str:
    head = (f"{'shape':<10} {'N':>3} {'side':>4} {'G':>3} {'D':>3} | {'ours f/b ms':>15} | {'ref f/b ms':>15} | "
            f"{'x ref f+b':>8} | {'dcnv4 f/b ms':>15} | {'x dcnv4 f/b':>11} | {'GB/s f/b':>11} | "
            f"{'floor f/b ms':>15} | {'/floor f/b':>10}")
    lines = [head, "-" * len(head)]

    def pair(a, b):
        return f"{a:7.3f}/{b:7.3f}"

    for r in results:
        ms = r["ms"]
        ref = pair(ms["ref_fwd"], ms["ref_bwd"]) if "ref_fwd" in ms else "-"
        v4 = pair(ms["dcnv4_fwd"], ms["dcnv4_bwd"]) if "dcnv4_fwd" in ms else "-"
        v4x = (f"{r['speedup_vs_dcnv4_fwd']:5.2f}/{r['speedup_vs_dcnv4_bwd']:5.2f}"
               if "dcnv4_fwd" in ms else "-")
        lines.append(
            f"{r['name']:<10} {r['batch']:>3} {r['side']:>4} {r['groups']:>3} {r['depth']:>3} | "
            f"{pair(ms['ours_fwd'], ms['ours_bwd']):>15} | {ref:>15} | "
            f"{r.get('speedup_vs_ref_fwd_bwd', float('nan')):8.2f} | {v4:>15} | {v4x:>11} | "
            f"{r['ours_fwd_gbs']:5.1f}/{r['ours_bwd_gbs']:5.1f} | "
            f"{pair(r['floor_fwd_ms'], r['floor_bwd_ms']):>15} | "
            f"{r['ours_over_floor_fwd']:4.1f}/{r['ours_over_floor_bwd']:4.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--variants", default="t,h", help="comma list of t, h")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 50 on CUDA, 5 on CPU")
    parser.add_argument("--json", default=None, help="write the results (and the environment) here")
    parser.add_argument("--no-reference", action="store_true", help="skip timing the reference")
    parser.add_argument("--no-dcnv4", action="store_true", help="skip the DCNv4 baseline")
    parser.add_argument("--candidates", default=None,
                        help="'all' or a comma list: time these CUDA kernel candidates side by side "
                             "(through the CUDA emulation, on a tiny shape, without a GPU)")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="with --candidates: comma list")
    args = parser.parse_args(argv)
    device = args.device
    if args.candidates:
        return run_candidates(args, device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    batch = args.batch or (64 if device == "cuda" else 8)
    repeats = args.repeats or (50 if device == "cuda" else 5)
    if extension.kernels_for(torch.device(device)) is None:
        raise SystemExit(f"no compiled DCNv3 kernel for {device}: {extension.load_error(device)}")
    dcnv4, dcnv4_error = (None, "skipped") if (args.no_dcnv4 or device != "cuda") else _dcnv4_function()

    bandwidth = copy_bandwidth_gbs(device)
    results = []
    for shape in shapes_for(args.variants.split(","), batch):
        row = bench_shape(shape, dtype, device, repeats, not args.no_reference, dcnv4)
        results.append(summarise(row, bandwidth))
        print(f"done {shape.name}", flush=True)
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(dtype),
           "copy_bandwidth_gbs": bandwidth, "dcnv4": dcnv4_error or "timed", "repeats": repeats}
    _report(env, format_table(results), args.json, {"results": results})
    return results


if __name__ == "__main__":
    main()
