"""comp-serve throughput and latency for a 5 s clip, warm: requests per second, p50/p95 latency.

    python benchmarks/serve_speed.py [--model examples/out/run] [--seconds 5] [--threads 2] [--requests 20]
                                     [--clients 1 4]

The clip is generated (espeak-ng speech over a face, `--seconds` long). The real `comp-serve` runs in its own
process on a free port of 127.0.0.1 (models loaded once, `--threads` torch threads); after two discarded warm-up
requests, each client count in `--clients` sends `--requests` POST /predict requests in all, each client
waiting for its answer before sending the next. With one client the latency is the service time; with more,
requests wait in the server's queue (one clip in the models at a time), so latency grows and throughput does
not (`--queue` is raised so that no request is refused; refusals would be counted). "work" is the time the
server's own timings report (decode + extract + model), "overhead" the rest of the latency (upload, probe,
waiting in the queue, JSON). Numbers on 2 CPU cores are what the README quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "examples" / "out" / "run"
TEXT = ("I got the job today, I can hardly believe it. We are going to celebrate tonight with all our "
        "friends, and it will be wonderful.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _round(client, url: str, clip: Path, total: int, clients: int) -> dict:
    """`total` requests from `clients` threads, each sequential; latencies in seconds."""
    import httpx

    data = clip.read_bytes()
    latencies: list[float] = []
    statuses: list[int] = []
    work: list[float] = []  # seconds the server spent decoding, extracting and in the model (its timings_ms)
    lock = threading.Lock()
    shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def worker(n: int) -> None:
        with httpx.Client(timeout=600) as c:
            for _ in range(n):
                t0 = time.perf_counter()
                r = c.post(url, files={"file": ("clip.mp4", data, "video/mp4")})
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        work.append(sum(r.json()["timings_ms"].values()) / 1e3)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,)) for n in shares if n]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [lat for lat, s in zip(latencies, statuses) if s == 200]
    return {"clients": clients, "requests": total, "ok": len(ok), "refused_503": statuses.count(503),
            "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 3),
            "latency_p50_s": round(statistics.median(ok), 3) if ok else None,
            "latency_p95_s": round(_percentile(ok, 0.95), 3) if ok else None,
            "latency_max_s": round(max(ok), 3) if ok else None,
            # what the latency adds to the prediction itself: upload, probe, queueing, JSON
            "processing_p50_s": round(statistics.median(work), 3) if work else None,
            "overhead_p50_s": round(statistics.median(lat - w for lat, w in zip(ok, work)), 3) if ok else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="run folder or checkpoint (make demo writes one)")
    p.add_argument("--seconds", type=float, default=5.0, help="clip length")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of the server")
    p.add_argument("--requests", type=int, default=20, help="requests measured per client count")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent clients, one round each")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = p.parse_args()
    if not args.model.exists():
        sys.exit(f"{args.model}: no checkpoint; run `make demo` first or pass --model RUN")

    import httpx

    from demo import media

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="comp-bench-") as tmp:
        clip = media.make_clip(Path(tmp) / "clip.mp4", text=TEXT, face=True, duration_s=args.seconds)
        cmd = [sys.executable, "-c", "import sys; from pipeline.cli.serve import main; sys.exit(main())",
               "--model", str(args.model), "--port", str(port), "--threads", str(args.threads),
               "--device", args.device, "--queue", str(max(args.clients) + 1), "-q"]
        t0 = time.perf_counter()
        server = subprocess.Popen(cmd, cwd=ROOT)
        try:
            with httpx.Client(timeout=600) as c:
                while True:
                    if server.poll() is not None:
                        sys.exit(f"comp-serve exited with {server.returncode}")
                    try:
                        if c.get(base + "/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.2)
                ready = time.perf_counter() - t0
                warm = [c.post(base + "/predict", files={"file": ("clip.mp4", clip.read_bytes(), "video/mp4")})
                        for _ in range(2)]
                if any(r.status_code != 200 for r in warm):
                    sys.exit(f"warm-up failed: {warm[-1].status_code} {warm[-1].text[:300]}")
                timings = warm[-1].json()["timings_ms"]
                rounds = [_round(c, base + "/predict", clip, args.requests, n) for n in args.clients]
        finally:
            server.terminate()
            server.wait(60)
    print(json.dumps({"clip_s": args.seconds, "server_threads": args.threads, "cpus": os.cpu_count(),
                      "server_ready_s": round(ready, 1), "warm_timings_ms": timings, "rounds": rounds}, indent=2))
    print(f"\n{'clients':>7} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'work p50':>9} {'overhead p50':>13} {'503':>5}")
    for r in rounds:
        print(f"{r['clients']:>7} {r['requests_per_s']:>7.3f} {r['latency_p50_s']:>7.3f} {r['latency_p95_s']:>7.3f} "
              f"{r['processing_p50_s']:>9.3f} {r['overhead_p50_s']:>13.3f} {r['refused_503']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
