"""The host-time floor of the eager training step (Vim-Ti, batch 128, 224 px, as benchmark.py's eager mode).

One step's ATen calls and Triton launches are recorded as they reach the dispatcher (below autograd and autocast;
the backward's and the optimizer's included), then replayed from a bare Python loop: no model, no autograd, no
kernel wrappers, each Triton kernel through its C launcher. What the replay takes to enqueue is what any Python
implementation making those calls pays at least. Two lighter replays leave out the calls that launch nothing
(views and other metadata calls; then allocations too): they bound implementations that make fewer of them. With
``--benchmark`` (a benchmark.py JSON of the same call, graph and eager modes) the floor becomes a bound on the eager
ratio: a step takes at least the longer of its enqueue time and its GPU time (the captured step's).

    python scripts/host_floor.py --precisions fp32 bf16 --strategies none all:7 lower:19:9 \
        --benchmark bench.json --output floor.json
"""
import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import benchmark  # noqa: E402
import host_profile  # noqa: E402
from kernels.launch import Launcher  # noqa: E402

ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
METADATA = {"detach", "_record_function_enter_new", "_record_function_exit"}   # besides views: nothing launched
TIERS = ("all", "no_meta", "compute")   # every call; without metadata calls; without allocations either


class StepRecorder(TorchDispatchMode):
    """Records every ATen call that reaches the dispatcher below autograd as (kind, call, args, kwargs), kind one
    of 'meta' (views, detach, the profiler's record functions), 'alloc' (uninitialised memory) or 'compute' (the
    rest); with ``record_launches`` also every Triton launch through kernels.launch.Launcher as ('launch', C
    launcher, args), looked up once here so that its replay pays no key."""

    def __init__(self, record_launches=True):
        super().__init__()
        self.calls, self.record_launches, self._launch = [], record_launches, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        kind = "meta" if func.is_view or name in METADATA else "alloc" if name in ALLOCATIONS else "compute"
        self.calls.append((kind, func, args, kwargs))
        return func(*args, **kwargs)

    def __enter__(self):
        if self.record_launches:
            real = self._launch = Launcher.launch
            calls = self.calls

            def recording(launcher, grid, args, meta):
                real(launcher, grid, args, meta)
                found = launcher.compiled.get(launcher.key(args, meta)) if launcher.specialised else None
                if found is None:   # interpreted or compiled on this call: replayed the usual way
                    calls.append(("launch", lambda *a, _l=launcher, _g=grid, _m=meta: _l.launch(_g, a, _m), args, {}))
                else:
                    c_launch, constexprs = found
                    calls.append(("launch", lambda *a, _c=c_launch, _g=grid, _k=constexprs: _c(_g, *a, *_k),
                                  args, {}))
            Launcher.launch = recording
        return super().__enter__()

    def __exit__(self, *exc):
        if self._launch is not None:
            Launcher.launch = self._launch
        return super().__exit__(*exc)

    def counts(self):
        """Calls per kind, and the 20 most frequent ATen calls."""
        out = {kind: 0 for kind in ("meta", "alloc", "compute", "launch")}
        for kind, *_ in self.calls:
            out[kind] += 1
        names = Counter(str(call) for kind, call, _, _ in self.calls if kind != "launch")
        return out, names.most_common(20)


def replay(calls, tier="all"):
    """Makes the recorded calls again (without recording autograd), leaving out those the tier drops."""
    skip = {"all": (), "no_meta": ("meta",), "compute": ("meta", "alloc")}[tier]
    with torch.no_grad():
        for kind, call, args, kwargs in calls:
            if kind not in skip:
                call(*args, **kwargs)


def enqueue_ms(fns, repeats):
    """{name: (median, minimum)} host time (ms) of each fn() started on an idle GPU, the time to enqueue its work;
    the fns run in turn, round after round, so that a slower phase of the host meets them all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return {name: (statistics.median(t) * 1e3, min(t) * 1e3) for name, t in times.items()}


def measure(fusion, precision, repeats, profile=False):
    step, x, y = host_profile.eager_step(fusion, precision)
    recorder = StepRecorder()
    with recorder:
        step(x, y)
    torch.cuda.synchronize()
    fns = {"step": lambda: step(x, y), **{f"replay_{t}": lambda t=t: replay(recorder.calls, t) for t in TIERS}}
    result = {"strategy": benchmark.strategy_label(fusion), "precision": precision}
    for name, (median, minimum) in enqueue_ms(fns, repeats).items():
        result[f"{name}_ms"], result[f"{name}_min_ms"] = median, minimum
    result["calls"], result["top_calls"] = recorder.counts()
    if profile:   # which calls the replay's host time goes to, by call and input shapes
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(3):
                replay(recorder.calls)
            torch.cuda.synchronize()
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25,
                                                                 max_name_column_width=40, max_shapes_column_width=70))
    return result


def bounds(floors, bench):
    """Per fused row of the floors, the captured and eager ratios of benchmark.py's JSON and the ratio bound that
    each replay tier implies: max(replay, captured step) of the fused step over the same of the no-fusion step,
    from the replays' medians and (``_min``) their minima."""
    rows = {(r["precision"], r["mode"], r["strategy"]): r["step_ms"] for r in bench["results"]}
    floor = {(r["precision"], r["strategy"]): r for r in floors}
    out = []
    for r in floors:
        p, s = r["precision"], r["strategy"]
        none, graph = floor.get((p, "none")), rows.get((p, "graph", s))
        graph_none, eager, eager_none = (rows.get((p, m, n)) for m, n in
                                         (("graph", "none"), ("eager", s), ("eager", "none")))
        if s == "none" or None in (none, graph, graph_none, eager, eager_none):
            continue
        row = {"precision": p, "strategy": s, "graph_ratio": graph / graph_none, "eager_ratio": eager / eager_none}
        for tier in TIERS:
            for suffix in ("", "_min"):
                key = f"replay_{tier}{suffix}_ms"
                row[f"floor_ratio_{tier}{suffix}"] = max(r[key], graph) / max(none[key], graph_none)
        out.append(row)
    return out


def measure_all(args):
    floors = []
    for precision in args.precisions:
        for fusion in args.strategies:
            r = measure(fusion, precision, args.repeats, args.profile)
            floors.append(r)
            print(f"{precision} {r['strategy']:<16} enqueue ms, median (min): "
                  + ", ".join(f"{label} {r[f'{name}_ms']:.1f} ({r[f'{name}_min_ms']:.1f})" for name, label in (
                      ("step", "step"), ("replay_all", "| replay all"), ("replay_no_meta", "no metadata"),
                      ("replay_compute", "compute only"))) + f" | calls {r['calls']}", flush=True)
    return floors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", type=benchmark.parse_strategy,
                   default=[benchmark.parse_strategy(s) for s in ("none", "all:7", "lower:19:9")])
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table of three replays")
    p.add_argument("--benchmark", default="", help="benchmark.py JSON with graph and eager rows of this call")
    p.add_argument("--floors", default="", help="take the floors from this JSON (an earlier --output) instead of "
                                                "measuring them: the bounds of a call, worked out afterwards")
    p.add_argument("--output", default="")
    a = p.parse_args()
    if a.floors:
        with open(a.floors) as f:
            out = json.load(f)
    else:
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "floors": measure_all(a)}
    if a.benchmark:
        with open(a.benchmark) as f:
            out["bounds"] = bounds(out["floors"], json.load(f))
        for b in out["bounds"]:
            print(f"{b['precision']} {b['strategy']:<16} graph {b['graph_ratio']:.3f} eager {b['eager_ratio']:.3f} "
                  "| floor ratio (all / no metadata / compute only), medians " + " / ".join(
                      f"{b[f'floor_ratio_{t}']:.3f}" for t in TIERS) + ", minima " + " / ".join(
                      f"{b[f'floor_ratio_{t}_min']:.3f}" for t in TIERS))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
