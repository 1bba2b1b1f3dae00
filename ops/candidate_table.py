"""Which CUDA kernel candidate runs, per direction, dtype and shape class (read by candidates.py).

Change an entry when ``python -m internimage.ops.bench --candidates all`` on a GPU measures another
candidate faster; docs/benchmarks/ops/NOTES.md describes each candidate. Untiled everywhere until a
GPU has timed the others.
"""
_UNTILED = {"large": "untiled", "medium": "untiled", "small": "untiled"}

TABLE = {
    "forward": {
        "float16": dict(_UNTILED),
        "bfloat16": dict(_UNTILED),
        "float32": dict(_UNTILED),
        "float64": dict(_UNTILED),
    },
    "backward": {
        "float16": dict(_UNTILED),
        "bfloat16": dict(_UNTILED),
        "float32": dict(_UNTILED),
        "float64": dict(_UNTILED),
    },
}
