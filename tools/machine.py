"""What a saved measurement records about the machine it ran on (the tools' JSON files)."""
import os
import platform

import torch


def machine_info() -> dict:
    """CPUs, processor, torch version and threads, and the load average when the run ended (a shared
    machine's load explains noisy numbers)."""
    return {"cpus": os.cpu_count(), "processor": platform.processor() or "unknown",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg()}
