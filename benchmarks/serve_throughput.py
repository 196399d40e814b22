"""Requests/s and p50/p95 latency of a running serve.py at several concurrencies, with the openai client.

    python serve.py --model_path CKPT --port 8000 &
    python benchmarks/serve_throughput.py --url http://127.0.0.1:8000/v1 --image IMG --requests 32

Concurrency 1 is the sequential baseline (one request after another). Every request asks the same prompt about
the same image with greedy decoding and a fixed max_tokens, so the batches do equal work. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", default="caption en")
    parser.add_argument("--max_tokens", type=int, default=20)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--api_key", default="none")
    args = parser.parse_args()
    with open(args.image, "rb") as f:
        url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=600)
    messages = [{"role": "user", "content": [{"type": "text", "text": args.prompt},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    def one(_: int) -> float:
        start = time.perf_counter()
        client.chat.completions.create(model="paligemma", messages=messages, max_tokens=args.max_tokens)
        return time.perf_counter() - start

    one(0)  # warm-up
    print(f"CPU: {platform.processor() or platform.machine()}; {args.requests} requests per row, "
          f"max_tokens {args.max_tokens}\n")
    print("| concurrency | requests/s | p50 latency (s) | p95 latency (s) |\n|---|---|---|---|")
    for c in args.concurrency:
        start = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            latencies = sorted(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
        p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
        print(f"| {c} | {args.requests / wall:.2f} | {statistics.median(latencies):.2f} | {p95:.2f} |")


if __name__ == "__main__":
    main()
