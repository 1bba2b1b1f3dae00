"""One CPU rank under DeepSpeed ZeRO-3 with every parameter partitioned (persistence threshold 0):
every weight of the DCNv3 blocks (projections, depthwise conv, the H/G gate) reaches the forward
only through ZeRO-3's gathers, on both paths to the offsets and mask (one GEMM on the packed
weights, which reads the offset and mask Linears' weights outside their forward, and two GEMMs).
Prints the largest gradient difference to a plain copy of the model, plain and with activation
checkpointing.

    python -m tests.model.zero3_dcnv3_check PORT   (from the repository root; the test runs it)
"""
from __future__ import annotations

import copy
import json
import os
import sys

os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from internimage.model import DCNv3  # noqa: E402
from internimage.pretrain.engine import register_borrowed_parameters  # noqa: E402


class TwoBlocks(torch.nn.Module):
    def __init__(self, checkpointed: bool):
        super().__init__()
        self.checkpointed = checkpointed
        self.a = DCNv3(32, 4, center_feature_scale=True)
        self.b = DCNv3(32, 4, center_feature_scale=False)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(std=0.2)

    def forward(self, x):
        if self.checkpointed:
            x = torch.utils.checkpoint.checkpoint(self.a, x, use_reentrant=False)
        else:
            x = self.a(x)
        # a sees 42 pixels (≥ C = 32: one GEMM on the packed weights), b 15 (two GEMMs, outputs packed).
        return self.b(x[:, :3, :5])


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "Adam", "params": {"lr": 0.0, "torch_adam": True}}}  # lr 0: weights stay
    x = torch.randn(1, 6, 7, 32, generator=torch.Generator().manual_seed(1))
    result = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = TwoBlocks(checkpointed)
        plain = copy.deepcopy(model)
        register_borrowed_parameters(model)  # as pretrain/engine.py does
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        worst = 0.0
        for _ in range(2):  # the second step runs on DeepSpeed's recorded trace
            plain.zero_grad()
            engine.backward(engine(x).square().mean())
            plain(x).square().mean().backward()
            for p, q in zip(engine.module.parameters(), plain.parameters()):
                worst = max(worst, (safe_get_full_grad(p) - q.grad).abs().max().item())
            engine.step()
        partitioned = all(p.ds_tensor.numel() > 0 and p.data.numel() == 0 for p in engine.module.parameters())
        result["checkpointed" if checkpointed else "plain"] = {"max_grad_diff": worst, "partitioned": partitioned}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
