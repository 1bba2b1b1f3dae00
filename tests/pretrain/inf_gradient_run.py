"""Per-rank entry of the non-finite gradient test: pretraining with one ``inf`` written into one
gradient of rank 1 at optimizer step ``INF_AT_STEP`` (once), the loss staying finite.

DeepSpeed 0.19.8 started skipping bf16 steps with a non-finite gradient norm by itself; earlier
versions apply them. Its own check is switched off here, so the test sees what the trainer does on
every DeepSpeed version users run.
"""
import os
import sys

import torch
import deepspeed.runtime.zero.stage3 as zero_stage3

from internimage.pretrain.config import load_config
from internimage.pretrain.entry import run_entry
from internimage.pretrain.trainer import Trainer

INF_AT_STEP = int(os.environ["INF_AT_STEP"])
if hasattr(zero_stage3, "is_invalid_grad_norm"):
    zero_stage3.is_invalid_grad_norm = lambda norm: False


class InfGradientTrainer(Trainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.poisoned = False
        param = next(p for p in self.engine.module.parameters() if p.requires_grad)
        param.register_hook(self._poison)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        if self.rank == 1 and self.progress.step + 1 == INF_AT_STEP and not self.poisoned:
            self.poisoned = True
            grad = grad.contiguous().clone()
            grad.view(-1)[0] = float("inf")
        return grad


if __name__ == "__main__":
    sys.exit(run_entry(None, load_config, lambda cfg: InfGradientTrainer(cfg).run()))
