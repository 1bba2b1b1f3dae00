"""Parameter and FLOP report through fvcore, with a handle for the DCNv3 core (docs/model.md §1 convention).

FLOPs here are multiply-adds, as fvcore and the published InternImage numbers count them. fvcore
traces a real forward pass (the meta device does not survive ``torch.jit.trace``), so variants are
built on the meta device and then given zero-stride weights: H and G are counted in about 2 GB.

    python -m internimage.model.report --model internimage_h --img-size 640 [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from internimage.ops import OP_NAME

from .factory import create_model, list_models

DCNV3_MACS_PER_POINT = 5  # 4 bilinear corners + the mask weight, per output channel and point
# Once a DeepSpeed ZeRO-3 engine exists in the process, F.linear stays replaced by this autograd
# Function (DeepSpeed's memory-efficient linear); count it as the linear it is.
ZERO3_LINEAR_OP = "prim::PythonOp.LinearFunctionForZeroStage3"

# docs/model.md §1: resolution, published multiply-adds (rounded), multiply-adds counted layer by layer, params.
PUBLISHED = {
    "internimage_t": (224, 5e9, 4.9e9, 29_918_424), "internimage_s": (224, 8e9, 8.3e9, 50_079_880),
    "internimage_b": (224, 16e9, 16.2e9, 97_461_832), "internimage_l": (384, 108e9, 107.8e9, 223_334_810),
    "internimage_xl": (384, 163e9, 162.9e9, 334_819_780),
    "internimage_h": (640, 1478e9, 1493e9, 1_089_636_760),
    "internimage_g": (512, 2700e9, 2711e9, 3_076_373_352),
}


def dcnv3_flop_handle(inputs, outputs) -> int:
    """fvcore handle: 5 multiply-adds per output element per sampling point (the op's inputs are
    value, offset_mask (…, G·P·3), then the geometry: groups is the 11th)."""
    from fvcore.nn.jit_handles import get_shape

    offset_mask_shape, out_shape = get_shape(inputs[1]), get_shape(outputs[0])
    groups = inputs[10].toIValue()
    points = offset_mask_shape[-1] // (3 * groups)
    numel = 1
    for size in out_shape:
        numel *= size
    return DCNV3_MACS_PER_POINT * points * numel


def _section(name: str) -> str:
    """Report row of a parameter or module name: stem, stage i, or head."""
    parts = name.split(".")
    if parts[0] == "patch_embed":
        return "stem"
    if parts[0] == "levels" and len(parts) > 1:
        return f"stage {parts[1]}"
    return "head"


def model_report(model: nn.Module, img_size: int) -> dict:
    """Parameters and fvcore multiply-adds per image at ``img_size``², per section and in total.

    Returns a JSON-able dict: ``rows`` [{section, params, flops}], ``params``, ``flops``,
    ``unsupported_ops`` (op → count that fvcore skipped, elementwise ops mostly).
    """
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import linear_flop_jit

    device = next(model.parameters()).device
    image = torch.zeros(1, 3, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    analysis = FlopCountAnalysis(model, image).set_op_handle(OP_NAME, dcnv3_flop_handle,
                                                             ZERO3_LINEAR_OP, linear_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    by_module = analysis.by_module()
    model.train(was_training)

    params, flops = defaultdict(int), defaultdict(int)
    for name, param in model.named_parameters():
        params[_section(name)] += param.numel()
    for name in [n for n in by_module if n and "." not in n] + [f"levels.{i}" for i in range(len(model.levels))]:
        if name != "levels":
            flops[_section(name)] += by_module[name]
    sections = sorted(params, key=lambda s: (s != "stem", s == "head", s))
    return {
        "img_size": img_size,
        "rows": [{"section": s, "params": params[s], "flops": flops[s]} for s in sections],
        "params": sum(params.values()),
        "flops": analysis.total(),
        "unsupported_ops": dict(analysis.unsupported_ops()),
    }


def count_flops(model: nn.Module, img_size: int) -> int:
    """fvcore multiply-adds for one image of ``img_size``² (DCNv3 core counted)."""
    return model_report(model, img_size)["flops"]


def zero_stride_weights(model: nn.Module) -> nn.Module:
    """Replaces every parameter and buffer by a zero-stride view of one zero scalar, in place.

    The shapes stay, the memory goes: a meta-device model becomes runnable for tracing and counting.
    """
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            zeros = torch.zeros((), dtype=param.dtype).expand(param.shape)
            setattr(module, name, nn.Parameter(zeros, requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, torch.zeros((), dtype=buffer.dtype).expand(buffer.shape))
    return model


def report_for(name: str, img_size: int | None = None, **create_kwargs) -> dict:
    """Builds ``name`` without allocating its weights (``zero_stride_weights``) and reports it."""
    img_size = img_size or PUBLISHED[name][0]
    with torch.device("meta"):
        model = create_model(name, drop_path_rate=0.0, **create_kwargs)
    with torch.no_grad():
        report = model_report(zero_stride_weights(model), img_size)
    report["model"] = name
    if name in PUBLISHED and img_size == PUBLISHED[name][0] and not create_kwargs:
        _, report["published_flops"], report["layerwise_flops"], report["published_params"] = PUBLISHED[name]
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['model']} @ {report['img_size']}x{report['img_size']}",
             f"{'section':<10}{'params':>16}{'GMACs':>12}"]
    for row in report["rows"]:
        lines.append(f"{row['section']:<10}{row['params']:>16,}{row['flops'] / 1e9:>12.3f}")
    lines.append(f"{'total':<10}{report['params']:>16,}{report['flops'] / 1e9:>12.3f}")
    if "published_flops" in report:
        published, layerwise = report["published_flops"], report["layerwise_flops"]
        lines.append(f"published: {report['published_params']:,} params, {published / 1e9:g} GMACs "
                     f"(ours {report['flops'] / published - 1:+.1%}); counted layer by layer {layerwise / 1e9:g} "
                     f"GMACs (ours {report['flops'] / layerwise - 1:+.1%})")
    if report["unsupported_ops"]:
        skipped = ", ".join(f"{op}×{n}" for op, n in sorted(report["unsupported_ops"].items()))
        lines.append(f"not counted by fvcore (elementwise, no multiply-adds by convention): {skipped}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="internimage_t", choices=list_models() + ["all"])
    parser.add_argument("--img-size", type=int, default=None, help="default: the published resolution")
    parser.add_argument("--json", type=Path, default=None, help="also write the report(s) here")
    args = parser.parse_args(argv)
    names = list_models() if args.model == "all" else [args.model]
    reports = []
    for name in names:
        reports.append(report_for(name, args.img_size))
        print(format_report(reports[-1]), end="\n\n", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))


if __name__ == "__main__":
    main()
