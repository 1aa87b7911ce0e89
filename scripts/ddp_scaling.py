"""Scaling of the DDP training step: benchmark.py's JSON from one process and from N processes (one GPU each,
same call) -> step time, images/s over all GPUs, scaling efficiency = img/s on N / (N x img/s on 1), peak
memory per GPU and the fusion ratios on N.

    python scripts/ddp_scaling.py one_gpu.json n_gpus.json [--output scaling.json]
"""
import argparse
import json

KEY = ("model", "ssm_backend", "precision", "batch_size", "mode", "variant", "strategy")


def scaling_rows(one, many):
    """Rows of ``many`` (N processes) with their efficiency against the same configuration in ``one``."""
    base = {tuple(r[k] for k in KEY): r for r in one}
    rows = []
    for r in many:
        b = base.get(tuple(r[k] for k in KEY))
        if b is None or b["world_size"] != 1:
            raise SystemExit(f"ddp_scaling.py: error: no one-process run of {r['mode']} {r['strategy']} "
                             f"{r['precision']} in the first file")
        rows.append({**{k: r[k] for k in KEY}, "world_size": r["world_size"], "step_ms_1": b["step_ms"],
                     "step_ms_n": r["step_ms"], "images_per_s_1": b["images_per_s"],
                     "images_per_s_n": r["images_per_s"],
                     "efficiency": r["images_per_s"] / (r["world_size"] * b["images_per_s"]),
                     "peak_mib_per_gpu": r["peak_mib"], "time_vs_none_n": r["time_vs_none"]})
    return rows


def markdown(rows):
    lines = ["| model | precision | mode | strategy | GPUs | step ms (1 / N) | img/s (1 / N) | efficiency "
             "| peak MiB per GPU | time vs none (N) |", "|" + " --- |" * 10]
    for r in rows:
        ratio = "-" if r["time_vs_none_n"] is None else f"{r['time_vs_none_n']:.3f}"
        mem = "-" if r["peak_mib_per_gpu"] is None else f"{r['peak_mib_per_gpu']:.0f}"
        lines.append(f"| {r['model'].split('_')[1]} | {r['precision']} | {r['mode']} | {r['strategy']} "
                     f"| {r['world_size']} | {r['step_ms_1']:.1f} / {r['step_ms_n']:.1f} "
                     f"| {r['images_per_s_1']:.0f} / {r['images_per_s_n']:.0f} | {r['efficiency']:.3f} | {mem} "
                     f"| {ratio} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("one", help="benchmark.py --output of the one-process run")
    p.add_argument("many", help="benchmark.py --output of the N-process run")
    p.add_argument("--output", default="", help="also write the rows as JSON here")
    args = p.parse_args()
    rows = scaling_rows(*(json.load(open(f))["results"] for f in (args.one, args.many)))
    print(markdown(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
