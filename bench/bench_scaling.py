"""How far the serving fabric scales: gateways x workers with the echo engine (no model cost).

    python bench/bench_scaling.py                      # the full grid, ~3-5 minutes on 2 cores
    python bench/bench_scaling.py --gateways 1,2 --workers 1,2 --requests 32    # a quick look

Starts, as local processes on loopback: one redis-server, up to 4 gateways and up to 8 workers
(ENGINE=echo: each "generates" its prompt's tokens again, one per 2 ms engine step, so nothing but
the fabric costs anything). For every (gateways, workers) cell it sends a bounded number of streaming
/v1/completions requests, a fixed number in flight, round-robin over the gateways, and measures:

- streamed tokens/s: completion tokens received by the clients over the wall time of the cell;
- TTFT at rest: the time to the first token of a lone request (median of a few), i.e. what the
  HTTP + tokenization + XADD + XREADGROUP + one engine step + PUBLISH + SSE path adds to a request;
- TTFT and TPOT (time per output token after the first) under the load, p50 and p95; the echo
  engine's own TPOT is its 2 ms step, the rest is what the fabric adds;
- CPU-seconds per 1000 tokens spent by the gateways, the workers, Redis and the load generator,
  and how busy the machine's cores were: this says where the ceiling is and why.

Results: bench/results/scaling.json (everything) and bench/results/scaling.md (the table and the
reading of it). A benchmark, not a test: nothing here passes or fails. All processes run niced.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.fleet import NICE, Fleet  # noqa: E402

MODEL = "bench-echo"
ECHO_STEP_S = 0.002  # worker/engine/echo_engine.py's default step delay


@dataclass
class Cell:
    gateways: int
    workers: int
    requests: int
    concurrency: int
    max_tokens: int
    wall_s: float = 0.0
    tokens: int = 0
    errors: int = 0
    tokens_per_s: float = 0.0
    ttft_idle_ms: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p95_ms: float = 0.0
    tpot_p50_ms: float = 0.0
    tpot_p95_ms: float = 0.0
    cpu_s_per_1k_tokens: dict[str, float] = field(default_factory=dict)
    cores_busy: float = 0.0  # CPU-seconds of our processes / wall seconds
    busiest: dict[str, float] = field(default_factory=dict)  # per component: the busiest process's cores
    machine_busy: float = 0.0  # the whole machine (ours and everyone else's), 0..1


# -- load ------------------------------------------------------------------------------------------

@dataclass
class Sample:
    ok: bool
    tokens: int = 0
    ttft: float = 0.0
    tpot: float | None = None


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Sample(False)
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    last = time.perf_counter()
                    first = first or last
    except httpx.HTTPError:
        return Sample(False)
    if first is None:
        return Sample(False)
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Sample(True, tokens, first - start, tpot)


async def run_load(urls: list[str], n: int, concurrency: int, max_tokens: int) -> tuple[list[Sample], float]:
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def bounded(i: int) -> Sample:
            async with gate:
                prompt = f"request {i}: the quick brown fox jumps over the lazy dog"
                return await one_request(client, urls[i % len(urls)], prompt, max_tokens)

        start = time.perf_counter()
        samples = await asyncio.gather(*(bounded(i) for i in range(n)))
        return list(samples), time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def measure(fleet: Fleet, g: int, w: int, args: argparse.Namespace) -> Cell:
    urls = [u for u, _ in fleet.gateways[:g]]
    cell = Cell(g, w, args.requests, args.concurrency, args.max_tokens)
    # Warm up every gateway and worker path (tokenizer caches, connection pools), unmeasured.
    asyncio.run(run_load(urls, max(2 * g, w), min(args.concurrency, max(2 * g, w)), 8))
    idle, _ = asyncio.run(run_load(urls, 8, 1, 4))
    cell.ttft_idle_ms = statistics.median(s.ttft for s in idle if s.ok) * 1000
    before, machine_before = fleet.cpu_seconds(), psutil.cpu_times()
    samples, wall = asyncio.run(run_load(urls, args.requests, args.concurrency, args.max_tokens))
    after, machine_after = fleet.cpu_seconds(), psutil.cpu_times()
    ok = [s for s in samples if s.ok]
    cell.wall_s, cell.errors = wall, len(samples) - len(ok)
    cell.tokens = sum(s.tokens for s in ok)
    cell.tokens_per_s = cell.tokens / wall
    cell.ttft_p50_ms, cell.ttft_p95_ms = (pct([s.ttft for s in ok], q) * 1000 for q in (0.5, 0.95))
    tpots = [s.tpot for s in ok if s.tpot is not None]
    cell.tpot_p50_ms, cell.tpot_p95_ms = (pct(tpots, q) * 1000 for q in (0.5, 0.95))
    by_process = {k: after[k] - before.get(k, 0.0) for k in after}
    components = list(dict.fromkeys(name for name, _pid in by_process))
    spent = {c: sum(v for (name, _), v in by_process.items() if name == c) for c in components}
    cell.cpu_s_per_1k_tokens = {k: round(v / max(cell.tokens, 1) * 1000, 4) for k, v in spent.items()}
    cell.cores_busy = sum(spent.values()) / wall
    cell.busiest = {c: round(max(v for (name, _), v in by_process.items() if name == c) / wall, 3)
                    for c in components}
    idle = lambda t: t.idle + getattr(t, "iowait", 0.0)  # noqa: E731
    total = sum(machine_after) - sum(machine_before)
    cell.machine_busy = 1 - (idle(machine_after) - idle(machine_before)) / total if total > 0 else 0.0
    return cell


def engine_alone(batch: int, max_tokens: int) -> float:
    """Tokens/s of the echo engine by itself (no Redis, no HTTP): the ceiling the fabric is measured against."""
    from protocol.messages import SamplingParams
    from tests.tiny_models import make_tokenizer
    from worker.engine.api import EngineRequest
    from worker.engine.echo_engine import EchoEngine

    tok = make_tokenizer()
    engine = EchoEngine(tok, max_batch=batch)
    prompt = tok.encode("the quick brown fox jumps over the lazy dog")
    for i in range(batch):
        engine.add_request(EngineRequest(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens)))
    tokens, start = 0, time.perf_counter()
    while engine.has_work():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - start)


# -- report ----------------------------------------------------------------------------------------

def machine() -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform()}


def ceiling_line(best: Cell, per_1k: dict[str, float], total: float, fabric: float, cpus: int,
                 machine_busy: float, ours: float) -> str:
    costs = ", ".join(f"{k} {v:.0f}" for k, v in per_1k.items())
    head = (f"The best cell streamed {best.tokens_per_s:,.0f} tokens/s ({best.gateways} gateway(s), "
            f"{best.workers} worker(s)). Every 1000 streamed tokens cost about {total:.0f} CPU-ms (medians: {costs}), "
            f"so {cpus} cores can carry at most ~{cpus * 1e6 / total:,.0f} tokens/s with the load generator on them, "
            f"~{cpus * 1e6 / fabric:,.0f} without it.")
    if machine_busy >= 0.85:
        return (f"- **The ceiling is the CPU count.** {head} During the cells the machine was {machine_busy:.0%} "
                f"busy (median), our processes using {ours:.2f} cores of it and other work the rest: no core was "
                "left idle for more gateways or workers, so adding them past that point only adds processes that "
                "take turns on the same cores.")
    return (f"- **The ceiling.** {head} The machine was only {machine_busy:.0%} busy (median), so in these "
            "cells the limit was not the cores but the work in flight: more concurrent requests, or fewer "
            "processes sharing them, would go further.")


def per_token_growth(cells: list[Cell], best: Cell, cpus: int) -> str:
    """Why more processes than cores made things slower: the CPU per token grows with them."""
    def cost(c: Cell) -> float:
        return sum(c.cpu_s_per_1k_tokens.values()) * 1000

    small = min(cells, key=lambda c: (c.gateways * c.workers, c.gateways))
    large = max(cells, key=lambda c: (c.gateways * c.workers, c.gateways))
    w1 = [c for c in cells if c.gateways == small.gateways]
    worker_costs = ", ".join(f"{c.cpu_s_per_1k_tokens['workers'] * 1000:.0f}" for c in w1)
    worker_counts = ", ".join(str(c.workers) for c in w1)
    return (f"- **More processes cost more CPU per token.** {small.gateways} gateway(s) and {small.workers} "
            f"worker(s) spent {cost(small):.0f} CPU-ms per 1000 tokens in all; {large.gateways} and "
            f"{large.workers} spent {cost(large):.0f}. The workers' share ({worker_counts} workers: "
            f"{worker_costs} CPU-ms) grows because the same requests are split into smaller batches: every "
            "engine step costs a publish round trip and a hand-off between threads whatever its size, and "
            f"{large.concurrency} requests in flight over {large.workers} workers make batches of about "
            f"{max(1, large.concurrency // large.workers)} instead of {large.concurrency}. More gateways mean "
            "one PUBLISH per gateway per step instead of one. With the cores "
            "already busy, throughput follows the CPU per token: the best cell here had "
            f"{best.gateways} gateway(s) and {best.workers} worker(s) on {cpus} cores.")


def render_markdown(result: dict) -> str:
    cells = sorted((Cell(**c) for c in result["cells"]), key=lambda c: (c.gateways, c.workers))
    m, cpus = result["machine"], result["machine"]["cpus"]
    best = max(cells, key=lambda c: c.tokens_per_s)
    first = cells[0]
    per_1k = {k: statistics.median(c.cpu_s_per_1k_tokens[k] for c in cells) * 1000
              for k in first.cpu_s_per_1k_tokens}  # CPU-ms per 1000 tokens
    total = sum(per_1k.values())
    fabric = total - per_1k.get("load generator", 0.0)
    machine_busy = statistics.median(c.machine_busy for c in cells)
    ours = statistics.median(c.cores_busy for c in cells)
    lines = [
        "# Scaling the fabric: gateways x workers, echo engine",
        "",
        f"`{result['command']}` on {cpus} CPUs ({m['cpu_model'] or 'unknown CPU'}), load average "
        f"{m['load_average_at_start']} at the start: other work shared the machine. Each cell: "
        f"{first.requests} streaming requests of {first.max_tokens} tokens, {first.concurrency} in flight, "
        "round-robin over the gateways; every process on loopback and niced. The echo engine takes 2 ms a "
        f"step; by itself (in-process, {result['engine_batch']} sequences a step) it produces "
        f"{result['engine_alone_tokens_per_s']:,.0f} tokens/s.",
        "",
        "TTFT at rest: one request alone. TPOT: time per output token after the first (the engine's own is "
        "2 ms). Cores: CPU-seconds of our processes per second; busiest: the busiest single process of that "
        "kind, in cores (1.0 = a whole core, the most one Python process can use for this work). Machine: "
        "how busy all the cores were, with everyone's work.",
        "",
        "| gateways | workers | tokens/s | TTFT at rest ms | TTFT p50 / p95 ms | TPOT p50 / p95 ms | cores (ours) "
        "| machine busy | busiest gateway / worker | CPU ms per 1k tokens: gateways, workers, redis, load gen "
        "| errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c in cells:
        cpu = c.cpu_s_per_1k_tokens
        lines.append(
            f"| {c.gateways} | {c.workers} | {c.tokens_per_s:,.0f} | {c.ttft_idle_ms:.1f} | "
            f"{c.ttft_p50_ms:.0f} / {c.ttft_p95_ms:.0f} | {c.tpot_p50_ms:.1f} / {c.tpot_p95_ms:.1f} | "
            f"{c.cores_busy:.2f} | {c.machine_busy:.0%} | {c.busiest['gateways']:.2f} / {c.busiest['workers']:.2f} | "
            f"{cpu['gateways'] * 1000:.0f}, {cpu['workers'] * 1000:.0f}, {cpu['redis'] * 1000:.0f}, "
            f"{cpu['load generator'] * 1000:.0f} | {c.errors} |")
    lines += [
        "",
        "## Where the ceiling is, and why",
        "",
        ceiling_line(best, per_1k, total, fabric, cpus, machine_busy, ours),
        per_token_growth(cells, best, cpus),
        f"- **Sizing.** A gateway spends ~{per_1k.get('gateways', 0):.0f} CPU-ms per 1000 streamed tokens, so one "
        f"gateway core carries roughly {1e6 / max(per_1k.get('gateways', 1.0), 1e-9):,.0f} tokens/s; a worker "
        f"adds ~{per_1k.get('workers', 0):.0f} CPU-ms per 1000 tokens of its own (detokenizing, publishing, "
        "handing steps between its engine thread and its event loop) on top of the model's compute. The work "
        "is Python, so one process uses at most one core for it: past one core's worth of tokens, add "
        "processes (on cores of their own).",
        f"- **Not the engine, not Redis.** The echo engine alone does {result['engine_alone_tokens_per_s']:,.0f} "
        f"tokens/s; Redis spends ~{per_1k.get('redis', 0):.0f} CPU-ms per 1000 tokens (one PUBLISH per gateway "
        "per step carries every request's token of that step), a small fraction of the rest.",
        "- **Latency.** TTFT at rest is the fabric's fixed cost per request: HTTP, tokenization, XADD, the "
        "worker's XREADGROUP wake-up, one 2 ms step, PUBLISH, the gateway's fan-out, SSE. Under load, TPOT "
        "above the engine's 2 ms step is the time a step's tokens wait for a CPU on their way out, and TTFT "
        "includes waiting behind the requests already streaming.",
        "- **What this means for a deployment.** Gateways scale with the streamed tokens/s (the gateway HPA "
        "scales on CPU, deploy/k8s), workers with the model's compute (KEDA on the job stream), each on its "
        "own cores; one Redis relays far more than either needs. A real model's step costs a worker far more "
        "than the echo engine's 2 ms, so with a real model the workers' compute sets the throughput and the "
        "per-token costs above are the overhead to budget for on top of it.",
        "",
        "Run to run the numbers move with whatever else the machine is doing; read the shape. Raw numbers: "
        "`scaling.json`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", default="1,2,4", help="gateway counts (comma-separated)")
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts (comma-separated)")
    parser.add_argument("--requests", type=int, default=64, help="requests per cell")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where results go")
    parser.add_argument("--report-only", action="store_true", help="rewrite scaling.md from scaling.json")
    args = parser.parse_args()
    if args.report_only:
        result = json.loads((args.out / "scaling.json").read_text())
        (args.out / "scaling.md").write_text(render_markdown(result))
        return
    gateways = sorted({int(x) for x in args.gateways.split(",")})
    workers = sorted({int(x) for x in args.workers.split(",")})
    os.nice(NICE)
    command = "python bench/bench_scaling.py " + " ".join(sys.argv[1:])
    result: dict = {"command": command.strip(), "machine": machine(), "cells": []}
    batch = args.concurrency
    result["engine_batch"] = batch
    result["engine_alone_tokens_per_s"] = engine_alone(batch, args.max_tokens)
    root = Path(tempfile.mkdtemp(prefix="spindle-bench-"))
    from tests.tiny_models import make_tiny_model

    make_tiny_model(root / "artifacts", MODEL, "llama", max_position_embeddings=4096)
    fleet = Fleet(root, root / "artifacts", MODEL, worker_env={"ENGINE": "echo", "TORCH_THREADS": "1"})
    try:
        fleet.scale_workers(1)
        fleet.scale_gateways(max(gateways))
        for w in workers:
            fleet.scale_workers(w)
            for g in gateways:
                cell = measure(fleet, g, w, args)
                result["cells"].append(asdict(cell))
                print(f"gateways={g} workers={w}: {cell.tokens_per_s:,.0f} tokens/s, TTFT at rest "
                      f"{cell.ttft_idle_ms:.1f} ms, TPOT p50 {cell.tpot_p50_ms:.1f} ms, "
                      f"{cell.cores_busy:.2f} cores busy, {cell.errors} errors", flush=True)
    finally:
        fleet.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scaling.md").write_text(render_markdown(result))
    print(f"wrote {args.out / 'scaling.md'} and scaling.json")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
