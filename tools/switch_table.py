"""The speed switches' table from the bench's JSON lines: per image size and setting, the median
steps/s over the repeats and the speed-up over the eager row (every switch off, TF32 as given).

    python -m internimage.pretrain.bench ... --compile both --whole-blocks both --repeat 2 > rows.jsonl
    python tools/switch_table.py rows.jsonl [more.jsonl ...] [--json out.json]
"""
import argparse
import json
import statistics
from collections import defaultdict

SWITCHES = ("compile", "whole_blocks", "channels_last", "tf32")


def setting_name(row: dict) -> str:
    on = [name for name in SWITCHES[:3] if row[name]]
    return (" + ".join(on) or "eager") + ("" if row["tf32"] else " (no TF32)")


def table(rows: list[dict]) -> tuple[str, list[dict]]:
    runs = defaultdict(list)
    for row in rows:
        if "steps_per_s" in row:
            runs[(row["img_size"], setting_name(row))].append(row["steps_per_s"])
    summary = []
    lines = ["| px | setting | steps/s per repeat | median | vs eager |", "|---|---|---|---|---|"]
    for (size, name), values in runs.items():
        median = statistics.median(values)
        eager = statistics.median(runs.get((size, "eager"), [float("nan")]))
        summary.append({"img_size": size, "setting": name, "steps_per_s": values, "median": median,
                        "speedup_vs_eager": median / eager})
        lines.append(f"| {size} | {name} | {', '.join(f'{v:.3f}' for v in values)} | {median:.3f} | "
                     f"{median / eager:.2f}x |")
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--json", help="also write the rows and the summary here")
    args = parser.parse_args()
    rows = [json.loads(line) for path in args.files for line in open(path) if line.startswith("{")]
    text, summary = table(rows)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
