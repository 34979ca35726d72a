"""`koala app` memory under sequential requests: the app process's RSS every 10 requests through a real
``gradio_client.Client``, on a tiny student (random weights, built here). The app runs in this process (a server
thread), so the RSS is the app's plus the client's. ``tests/test_app_load.py`` holds the growth over 50 requests
(after 10 warm-up ones) under a bound set from this measurement.

    python benchmarks/bench_app_memory.py --requests 60 --size 0 --json benchmarks/results/app-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=10, help="requests before the first measurement")
    ap.add_argument("--requests", type=int, default=60, help="measured requests")
    ap.add_argument("--size", type=int, default=0, help="width = height of the images (0: the model's, 32 here)")
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import psutil
    import torch
    from gradio_client import Client

    from koala.app import ModelSpec
    from koala.app.ui import serve
    from koala.compress import compress
    from koala.testing.tiny import save_tiny_pipeline

    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="koala-app-memory-")
    save_tiny_pipeline(f"{root}/pipe", seed=0, words=["a", "red", "blue", "circle", "square", "photo", "of"])
    compress(f"{root}/pipe", "koala-700m", f"{root}/student")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ModelSpec("student", unet=f"{root}/student/unet", base=f"{root}/pipe")
    app = serve([spec], port=port, device="cpu", block=False, log=lambda *_: None)
    client, proc = Client(f"http://127.0.0.1:{port}/", verbose=False), psutil.Process()
    rows = []
    try:
        for i in range(args.warmup + args.requests):
            t0 = time.perf_counter()
            client.predict(f"a red circle {i}", "", i, False, 1, None, args.size, args.size, 1, api_name="/generate")
            done = i + 1 - args.warmup
            if done >= 0 and done % 10 == 0:
                rows.append({"requests": done, "rss_mib": proc.memory_info().rss / 2**20})
                print(f"{done:4d} requests  rss {rows[-1]['rss_mib']:.1f} MiB  last {time.perf_counter() - t0:.2f} s")
    finally:
        app.close()
    grown = rows[-1]["rss_mib"] - rows[0]["rss_mib"]
    print(f"RSS grew {grown:+.1f} MiB over {args.requests} requests (after {args.warmup} warm-up ones)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "grown_mib": grown, "load": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
