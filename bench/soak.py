"""A bounded soak of `loraforge serve` with hostile requests mixed in (not run in CI).

Starts `loraforge serve` as a subprocess on 127.0.0.1 with the tiny random test model and
adapters (built in code, as tests/serve/serve_fixture.py does, plus broken adapters), then sends
mixed requests at a fixed concurrency twice: once all normal (the baseline), once with a share
of hostile ones. Every normal request is greedy, so its text is known in advance: a normal
request that fails or answers differently is a collateral failure (the target is 0). Prints a
markdown table: outcomes by kind, p50/p99 latency of normal requests in both runs, and the
server's RSS before and after.

    .venv/bin/python bench/soak.py                        # 2,000 requests per run, 10% hostile, 16 at a time
    .venv/bin/python bench/soak.py --requests 500 --max-seconds 60
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "serve")]
from serve_fixture import free_port, make_setup  # (the tests' tiny model and adapters)

BASE = "tiny-base"
MODELS = [BASE, "alpha", "beta", "gamma"]
PROMPTS = ["Hello", "The quick brown fox", "Paris is", "Once upon a time"]
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
BIG = 8 * 2 ** 20 + 1  # one byte over the default --max-body-bytes
CLOSED = 0  # status of a request whose upload the server cut short (it refused the body unread)


def prepare(root: Path) -> dict[str, Path]:
    """The tests' setup, plus a NaN adapter in the adapters directory and, under the allowed
    root, a truncated adapter and one whose weights are a symlink to outside."""
    paths = make_setup(root)
    good = paths["extra"] / "delta"
    nan = paths["adapters"] / "nanadapter"
    shutil.copytree(good, nan)
    tensors = load_file(nan / WEIGHTS)
    key = min(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan / WEIGHTS)
    truncated = paths["extra"] / "truncated"
    shutil.copytree(good, truncated)
    data = (good / WEIGHTS).read_bytes()
    (truncated / WEIGHTS).write_bytes(data[: len(data) // 2])
    linked = paths["extra"] / "linked"
    shutil.copytree(good, linked)
    (linked / WEIGHTS).unlink()
    (linked / WEIGHTS).symlink_to(paths["outside"] / "evil" / WEIGHTS)
    return paths


def start_server(paths: dict[str, Path], port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "loraforge", "serve", "--model", str(paths["base"]), "--adapters",
               str(paths["adapters"]), "--allow-root", str(paths["extra"]), "--served-model-name", BASE,
               "--host", "127.0.0.1", "--port", str(port), "--max-batch", "16", "--max-loaded", "4",
               "--log-level", "error"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become healthy")


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def normal_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def hostile_requests(paths: dict[str, Path]) -> dict[str, tuple[str, dict | bytes, int]]:
    """kind -> (route, body, expected status)."""
    c, load = "/v1/completions", "/v1/load_lora_adapter"
    base = {"model": BASE, "prompt": "Hello", "max_tokens": 8}
    return {
        "temperature 1e-300": (c, {**base, "temperature": 1e-300}, 200),
        "top_p 1e-45": (c, {**base, "temperature": 1.0, "top_p": 1e-45}, 200),
        "seed 2**64": (c, {**base, "seed": 2 ** 64}, 400),
        "lone surrogate": (c, b'{"model": "tiny-base", "prompt": "\\ud800"}', 400),
        "NUL in lora_path": (load, {"lora_name": "x", "lora_path": "/tmp/a\x00b"}, 400),
        "5,000-char model name": (c, {**base, "model": "m" * 5000}, 400),
        "NaN adapter": (c, {**base, "model": "nanadapter"}, 400),
        "body over 8 MiB": (c, b"x" * BIG, 413),
        "malformed JSON": (c, b'{"model": ', 400),
        "5,000 stop strings": (c, {**base, "stop": ["s" * 400] * 5000}, 400),
        "17 stop strings": (c, {**base, "stop": ["s"] * 17}, 400),
        "max_tokens beyond context": (c, {**base, "max_tokens": 10 ** 6}, 400),
        "prompt beyond context": (c, {**base, "prompt": "word " * 100_000}, 400),
        "truncated adapter load": (load, {"lora_name": "trunc", "lora_path": str(paths["extra"] / "truncated")}, 400),
        "weights symlinked outside": (load, {"lora_name": "lnk", "lora_path": str(paths["extra"] / "linked")}, 403),
    }


async def one(client: httpx.AsyncClient, route: str, body) -> tuple[int, str, float]:
    started = time.perf_counter()
    try:
        if isinstance(body, bytes):
            response = await client.post(route, content=body, headers={"content-type": "application/json"})
        else:
            response = await client.post(route, json=body)
        text = response.json()["choices"][0]["text"] if response.status_code == 200 and "choices" in response.text else ""
        return response.status_code, text, time.perf_counter() - started
    except (httpx.WriteError, httpx.RemoteProtocolError):  # the server answered and closed before all was sent
        return CLOSED, "", time.perf_counter() - started
    except (httpx.HTTPError, ValueError, KeyError) as err:
        return -1, type(err).__name__, time.perf_counter() - started


async def run(url: str, jobs: list, want: dict, concurrency: int, max_seconds: float) -> dict:
    """Send `jobs` ((kind, route, body, expected status)); returns outcomes and normal latencies."""
    outcomes: Counter = Counter()
    latencies: list[float] = []
    deadline = time.perf_counter() + max_seconds
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker(client):
        while not queue.empty() and time.perf_counter() < deadline:
            kind, route, body, expected = queue.get_nowait()
            status, text, seconds = await one(client, route, body)
            if kind == "normal":
                latencies.append(seconds)
                ok = status == 200 and text == want[(body["model"], body["prompt"])]
                outcomes["normal: ok" if ok else "normal: COLLATERAL FAILURE"] += 1
            else:
                if status == CLOSED and expected == 413:
                    outcomes[f"{kind}: refused unread (upload cut short)"] += 1
                else:
                    outcomes[f"{kind}: {'as expected' if status == expected else f'UNEXPECTED {status}'}"] += 1

    limits = httpx.Limits(max_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {"outcomes": outcomes, "latencies": latencies, "seconds": time.perf_counter() - started,
            "sent": sum(outcomes.values()), "planned": len(jobs)}


def plan(n: int, hostile_share: float, hostile: dict, max_tokens: int, seed: int) -> list:
    rng = random.Random(seed)
    kinds = sorted(hostile)
    jobs = []
    for _ in range(n):
        if rng.random() < hostile_share:
            kind = rng.choice(kinds)
            jobs.append((kind, *hostile[kind]))
        else:
            body = normal_body(rng.choice(MODELS), rng.choice(PROMPTS), max_tokens)
            jobs.append(("normal", "/v1/completions", body, 200))
    return jobs


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per run")
    parser.add_argument("--hostile", type=float, default=0.10, help="share of hostile requests in the second run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=180.0, help="time bound per run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="loraforge-soak-"))
    try:
        paths = prepare(root)
        port = free_port()
        process = start_server(paths, port)
        url = f"http://127.0.0.1:{port}"
        try:
            want = {}
            with httpx.Client(base_url=url, timeout=120) as client:
                for model in MODELS:
                    for prompt in PROMPTS:
                        response = client.post("/v1/completions", json=normal_body(model, prompt, args.max_tokens))
                        want[(model, prompt)] = response.json()["choices"][0]["text"]
            hostile = hostile_requests(paths)
            warm = asyncio.run(run(url, plan(200, 0.0, hostile, args.max_tokens, args.seed + 2), want,
                                   args.concurrency, args.max_seconds))
            rss_before = rss_bytes(process.pid)
            baseline = asyncio.run(run(url, plan(args.requests, 0.0, hostile, args.max_tokens, args.seed), want,
                                       args.concurrency, args.max_seconds))
            mixed = asyncio.run(run(url, plan(args.requests, args.hostile, hostile, args.max_tokens, args.seed + 1),
                                    want, args.concurrency, args.max_seconds))
            rss_after = rss_bytes(process.pid)
            healthy = httpx.get(url + "/health", timeout=10).status_code == 200
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(args, warm, baseline, mixed, rss_before, rss_after, healthy)
    collateral = mixed["outcomes"]["normal: COLLATERAL FAILURE"] + baseline["outcomes"]["normal: COLLATERAL FAILURE"]
    unexpected = sum(v for k, v in mixed["outcomes"].items() if "UNEXPECTED" in k)
    return 1 if collateral or unexpected or not healthy else 0


def report(args, warm, baseline, mixed, rss_before, rss_after, healthy):
    print(f"{args.requests} requests per run, {args.concurrency} at a time, {args.max_tokens} new tokens each; "
          f"second run {args.hostile:.0%} hostile. Sent: baseline {baseline['sent']}/{baseline['planned']} in "
          f"{baseline['seconds']:.0f} s, mixed {mixed['sent']}/{mixed['planned']} in {mixed['seconds']:.0f} s.\n")
    print("| outcome (mixed run) | requests |\n| --- | ---: |")
    for kind, count in sorted(mixed["outcomes"].items()):
        if kind != "normal: COLLATERAL FAILURE":
            print(f"| {kind} | {count} |")
    print(f"| **collateral: normal requests failing or answering differently, mixed run** | "
          f"{mixed['outcomes']['normal: COLLATERAL FAILURE']} |")
    print(f"| collateral in the baseline run | {baseline['outcomes']['normal: COLLATERAL FAILURE']} |\n")
    print("| normal requests | baseline (no hostile) | with hostile |\n| --- | ---: | ---: |")
    for label, q in (("p50 latency (s)", 0.50), ("p99 latency (s)", 0.99)):
        print(f"| {label} | {pct(baseline['latencies'], q):.3f} | {pct(mixed['latencies'], q):.3f} |")
    print(f"| mean latency (s) | {statistics.fmean(baseline['latencies']):.3f} | "
          f"{statistics.fmean(mixed['latencies']):.3f} |")
    change = (rss_after - rss_before) / rss_before
    print(f"\nserver RSS: {rss_before / 2 ** 20:.0f} MiB before (after a {warm['sent']}-request warm-up), "
          f"{rss_after / 2 ** 20:.0f} MiB after both runs ({change:+.1%}); /health afterwards: "
          f"{'ok' if healthy else 'FAILED'}")


if __name__ == "__main__":
    raise SystemExit(main())
