"""Engine benchmark: HF generate (one at a time, static batches), transformers' continuous batching
and this engine, side by side on one workload, one process each, same settings.

    nice python -m bench.bench_engine            # the full run (64 requests; long; minutes to an hour)
    nice python -m bench.bench_engine --quick    # a reduced sanity run (a few minutes)

Writes ``bench/results/engine[-quick].{json,md,png}``. Model: random weights in the shape of
SmolLM2-135M (``bench/smollm_shape.py``), built once into ``var/bench/``. dtype ``auto`` resolves as
the worker does (bfloat16 where the CPU has AVX512-BF16/AMX, else float32). Each system runs in a
fresh subprocess so its peak RSS is its own; a system that has not finished its workload by
``--time-limit`` is stopped and scored on what it produced by then (marked "truncated").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = {
    "hf_sequential": "HF generate, one at a time",
    "hf_static": "HF generate, static batches of 32",
    "hf_cb": "transformers continuous batching",
    "engine": "spindle paged engine (in-process)",
    "http": "spindle over HTTP (gateway + Redis + worker)",
}
BASELINES = {"hf_static": 2.0, "hf_cb": 3.0, "hf_sequential": 10.0}  # target ratios engine / baseline
BATCH1_TARGET = 1.5
HTTP_TARGET = 0.9  # the system over HTTP against the engine in-process
# How the systems' OpenMP threads wait between parallel regions (see worker/engine/__init__.py).
OMP_WAIT = {"spin": "GOMP_SPINCOUNT=300000", "passive": "OMP_WAIT_POLICY=PASSIVE", "inherit": "as inherited"}


def omp_env(env: dict[str, str], wait: str) -> dict[str, str]:
    if wait != "inherit":
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("GOMP_SPINCOUNT", None)
        name, value = OMP_WAIT[wait].split("=")
        env[name] = value
    return env


def workload_for(name: str, quick: bool):
    from bench.workload import make_workload

    if quick:
        common = {"n": 12, "rate": 20.0, "prompt_range": (16, 64), "output_range": (16, 48)}
        if name == "long":
            return make_workload("long", long_fraction=0.25, long_range=(512, 768), seed=1, **common)
        return make_workload("mixed", seed=0, **common)
    if name == "long":
        return make_workload("long", n=64, rate=8.0, long_fraction=0.25, seed=1)
    return make_workload("mixed", n=64, rate=8.0, seed=0)


# -- one system in a subprocess ----------------------------------------------------------------------


def run_one(args: argparse.Namespace) -> None:
    import torch

    from bench import systems
    from bench.workload import summarize
    from worker.engine.loader import load_engine, parse_bytes, resolve_dtype

    dtype = resolve_dtype(args.dtype, "cpu")
    result: dict = {"system": args.run_one, "workload": args.workload, "dtype": str(dtype).removeprefix("torch."),
                    "threads": torch.get_num_threads()}
    settings = argparse.Namespace(max_batch=args.max_batch, max_num_batched_tokens=args.max_num_batched_tokens,
                                  kv_cache_memory=args.kv_cache_memory, kv_block_size=16, torch_threads=0)
    if args.workload == "batch1":
        if args.run_one == "engine":
            engine = load_engine("paged", args.model_dir, "cpu", args.dtype, settings)
            result["batch1_tok_s"] = round(systems.batch1_engine(engine), 2)
        else:
            result["batch1_tok_s"] = round(systems.batch1_hf(systems.load_hf(args.model_dir, dtype)), 2)
    else:
        wl = workload_for(args.workload, args.quick)
        if args.run_one == "http":
            worker_env = {"ENGINE": "paged", "DEVICE": "cpu", "DTYPE": args.dtype, "MAX_BATCH": str(args.max_batch),
                          "MAX_NUM_BATCHED_TOKENS": str(args.max_num_batched_tokens),
                          "KV_CACHE_MEMORY": args.kv_cache_memory}
            timings, start, end, fleet_rss = systems.run_http(args.model_dir, wl, args.time_limit, worker_env)
            result["fleet_peak_rss_mb"] = round(fleet_rss / 1024**2, 1)
            runner = None
        elif args.run_one == "engine":
            target = functools.partial(load_engine, "paged", args.model_dir, "cpu", args.dtype, settings)
            runner = systems.run_engine
        else:
            target = systems.load_hf(args.model_dir, dtype)
            runner = {"hf_sequential": systems.run_hf_sequential, "hf_static": systems.run_hf_static,
                      "hf_cb": functools.partial(
                          systems.run_hf_continuous, kv_bytes=parse_bytes(args.kv_cache_memory),
                          max_batch=args.max_batch, max_batch_tokens=args.max_num_batched_tokens),
                      }[args.run_one]
        if runner is not None:
            timings, start, end = runner(target, wl, args.time_limit)
        summary = summarize(timings, start, end, len(wl.requests),
                            long_threshold=512 if args.quick else 1024)
        expected = sum(r.max_tokens for r in wl.requests)
        summary["truncated"] = summary["output_tokens"] < expected
        result["summary"] = summary
    # The process's own peak; for "http" the serving processes' (the client's own is not serving).
    result["peak_rss_mb"] = result.pop("fleet_peak_rss_mb", None) or round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(args.result).write_text(json.dumps(result))


def spawn(system: str, workload: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "bench.bench_engine", "--run-one", system, "--workload", workload,
           "--result", out, "--model-dir", str(args.model_dir), "--dtype", args.dtype,
           "--time-limit", str(args.time_limit), "--max-batch", str(args.max_batch),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--kv-cache-memory", args.kv_cache_memory]
    if args.quick:
        cmd.append("--quick")
    print(f"[bench] {workload:6s} {system:14s} ...", end="", flush=True)
    t0 = time.time()
    env = omp_env(dict(os.environ), args.omp_wait)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=args.time_limit * 2 + 600)
    if proc.returncode != 0:
        print(f" FAILED ({proc.returncode})\n{proc.stderr[-3000:]}")
        return {"system": system, "workload": workload, "error": proc.stderr[-2000:]}
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    s = result.get("summary") or {}
    shown = result.get("batch1_tok_s", s.get("output_tok_s"))
    print(f" {shown} tok/s ({time.time() - t0:.0f}s)", flush=True)
    return result


# -- report ------------------------------------------------------------------------------------------


def ratios(results: list[dict]) -> dict:
    out: dict = {}
    by = {(r["workload"], r["system"]): r for r in results if "error" not in r}
    for wl in sorted({r["workload"] for r in results if r["workload"] != "batch1"}):
        eng = by.get((wl, "engine"))
        if not eng:
            continue
        e = eng["summary"]["output_tok_s"]
        for base, target in BASELINES.items():
            b = by.get((wl, base))
            if b and b["summary"]["output_tok_s"]:
                r = e / b["summary"]["output_tok_s"]
                out[f"{wl}: engine / {base}"] = {"ratio": round(r, 2), "target": target, "met": r >= target}
        h = by.get((wl, "http"))
        if h and e:
            r = h["summary"]["output_tok_s"] / e
            out[f"{wl}: HTTP system / engine in-process"] = {"ratio": round(r, 2), "target": HTTP_TARGET,
                                                             "met": r >= HTTP_TARGET}
    e1, h1 = by.get(("batch1", "engine")), by.get(("batch1", "hf_sequential"))
    if e1 and h1:
        r = e1["batch1_tok_s"] / h1["batch1_tok_s"]
        out["batch-1 decode: engine / HF generate"] = {"ratio": round(r, 2), "target": BATCH1_TARGET,
                                                        "met": r >= BATCH1_TARGET}
    return out


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Engine benchmark{' (quick)' if report['quick'] else ''}", "",
             f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, transformers {env['transformers']}, "
             f"dtype {env['dtype']}, OpenMP wait {env.get('omp_wait', '?')} ({OMP_WAIT.get(env.get('omp_wait'), '')}), "
             f"load average at start {env['loadavg_start']}, at end {env['loadavg_end']}. "
             "Random weights in the shape of SmolLM2-135M; greedy; EOS ignored. Peak RSS is each system's "
             "process; for the HTTP system it is gateway + worker + Redis together.", ""]
    for wl in report["workloads"]:
        lines += [f"## Workload `{wl['name']}`: {wl['requests']} requests, prompts {wl['prompt_len_range']}, "
                  f"outputs {wl['output_len_range']}, arrivals over {wl['last_arrival_s']} s", "",
                  "| system | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | ITL p99, short prompts ms "
                  "| peak RSS MB | note |", "|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            if r["workload"] != wl["name"]:
                continue
            if "error" in r:
                lines.append(f"| {SYSTEMS[r['system']]} | failed | | | | | {r['error'][-80:]!r} |")
                continue
            s = r["summary"]
            note = (f"truncated at the time limit ({s['output_tokens']} tokens, "
                    f"{s['requests_started']}/{s['requests_expected']} requests started)") if s["truncated"] else ""
            lines.append(f"| {SYSTEMS[r['system']]} | {s['output_tok_s']} | {s['ttft_p50_ms']} / {s['ttft_p99_ms']} "
                         f"| {s['itl_p50_ms']} / {s['itl_p99_ms']} | {s['itl_short_prompts_p99_ms']} "
                         f"| {r['peak_rss_mb']} | {note} |")
        lines.append("")
    b1 = [r for r in report["results"] if r["workload"] == "batch1" and "error" not in r]
    if b1:
        lines += ["## Batch-1 decode (32-token prompt, 128 new tokens)", "", "| system | decode tok/s |", "|---|---|"]
        lines += [f"| {SYSTEMS[r['system']]} | {r['batch1_tok_s']} |" for r in b1]
        lines.append("")
    lines += ["## Ratios against the targets", "", "| comparison | measured | target | met |", "|---|---|---|---|"]
    for k, v in report["ratios"].items():
        lines.append(f"| {k} | {v['ratio']}x | {v['target']}x | {'yes' if v['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = [w["name"] for w in report["workloads"]]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in report["results"])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    metrics = [("output_tok_s", "output tokens/s (higher is better)"),
               ("ttft_p50_ms", "TTFT p50, ms (lower is better)"),
               ("itl_p99_ms", "inter-token latency p99, ms (lower is better)")]
    width = 0.8 / max(1, len(systems))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for i, sysname in enumerate(systems):
            vals = []
            for wl in wls:
                r = next((r for r in report["results"] if r["system"] == sysname and r["workload"] == wl), None)
                vals.append((r or {}).get("summary", {}).get(key) or 0)
            ax.bar([x + i * width for x in range(len(wls))], vals, width, label=SYSTEMS[sysname])
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(wls))], wls)
        ax.set_title(title, fontsize=10)
        if key != "output_tok_s":
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(systems), fontsize=8, frameon=False)
    fig.suptitle(f"spindle engine vs baselines ({report['environment']['dtype']}, "
                 f"{report['environment']['cores']} cores)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def environment(dtype: str) -> dict:
    import torch
    import transformers

    from worker.engine.loader import resolve_dtype

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "dtype": str(resolve_dtype(dtype, "cpu")).removeprefix("torch."),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced workload for a sanity run")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    ap.add_argument("--workloads", default=None, help="comma-separated: mixed, long, batch1 (default: all three)")
    ap.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per system and workload "
                    "(default 900, quick 120)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--kv-cache-memory", default="512MiB")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the benchmark processes")
    ap.add_argument("--omp-wait", choices=sorted(OMP_WAIT), default="spin",
                    help="how every system's OpenMP threads wait: spin (libgomp's default, GOMP_SPINCOUNT=300000: "
                         "fastest when each system has the cores to itself, as here), passive (OMP_WAIT_POLICY="
                         "PASSIVE, the worker's default: never collapses on shared cores), inherit")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--resume", action="store_true", help="keep the systems a killed run already finished")
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.time_limit is None:
        args.time_limit = 120.0 if args.quick else 900.0
    if args.run_one:
        run_one(args)
        return
    if args.nice:
        os.nice(args.nice)
    if args.model_dir is None:
        from bench.smollm_shape import make_artifact

        args.model_dir = make_artifact(REPO / "var" / "bench", dtype="bfloat16")
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    workloads = [w.strip() for w in (args.workloads or "mixed,long,batch1").split(",") if w.strip()]
    env = environment(args.dtype)
    env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    env["omp_wait"] = args.omp_wait
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("engine-quick" if args.quick else "engine")
    partial = Path(f"{stem}.partial.json")
    results = json.loads(partial.read_text()) if args.resume and partial.exists() else []
    done = {(r["workload"], r["system"]) for r in results if "error" not in r}
    results = [r for r in results if (r["workload"], r["system"]) in done]
    for wl in workloads:
        for system in wanted:
            if (wl == "batch1" and system not in ("engine", "hf_sequential")) or (wl, system) in done:
                continue
            results.append(spawn(system, wl, args))
            partial.write_text(json.dumps(results))  # a killed run can go on with --resume
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"quick": args.quick, "environment": env, "settings": {
        "max_batch": args.max_batch, "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory": args.kv_cache_memory, "time_limit_s": args.time_limit},
        "workloads": [workload_for(w, args.quick).describe() for w in workloads if w != "batch1"],
        "results": results}
    report["ratios"] = ratios(results)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2))
    Path(f"{stem}.md").write_text(markdown(report))
    plot(report, Path(f"{stem}.png"))
    print(markdown(report))
    partial.unlink(missing_ok=True)
    print(f"[bench] wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
