"""Times one InternImage-T training step on the CPU with the fused op and with the reference.

Numbers, not assertions: a tool. It needs the model, which ``internimage.ops`` must not import.

    python tools/train_step_speed.py [batch]      (default 4, 224², AdamW, cross-entropy)
"""
import statistics
import sys
import time

import torch

from internimage import ops
from internimage.model import create_model


def main(batch: int = 4) -> None:
    torch.manual_seed(0)
    model = create_model("internimage_t", num_classes=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    def median_seconds(repeats: int = 3) -> float:
        step()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    fused = median_seconds()
    with ops.use_reference():
        reference = median_seconds()
    fused_again = median_seconds()  # the machine may be shared: bracket the reference
    print(f"InternImage-T train step, batch {batch}, 224px, {torch.get_num_threads()} threads: "
          f"fused {fused:.2f} s / {fused_again:.2f} s, reference {reference:.2f} s, "
          f"speed-up {reference / min(fused, fused_again):.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
