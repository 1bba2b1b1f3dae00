"""Compile time of InternImage-H's distinct blocks (model.compile, inductor): H cut to depths (2, 1, 1, 1)
at full width holds every distinct block graph the full model has (one per stage width, stage 0's
drop-rate-0 block apart), so its first training step compiles what H's first step compiles.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python tools/block_compile_time.py     (a cold cache)
"""
import json
import time

import torch
from torch._dynamo.utils import counters

from internimage.model import create_model
torch.manual_seed(0)
model = create_model("internimage_h", num_classes=10, depths=(2, 1, 1, 1), level2_post_norm_block_ids=(0,),
                     drop_path_rate=0.2).train()
model.set_grad_checkpointing(True)
model.compile_blocks("inductor")
image = torch.randn(1, 3, 64, 64)
times = []
for step in range(2):
    t = time.perf_counter()
    model(image).sum().backward()
    times.append(time.perf_counter() - t)
print(json.dumps({"first_step_s": times[0], "second_step_s": times[1], "graphs": counters["stats"]["unique_graphs"],
                  "threads": torch.get_num_threads()}))
