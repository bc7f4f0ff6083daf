"""Memory and speed of `comp-predict --timeline` on a long generated recording.

    python benchmarks/timeline_memory.py --model examples/out/run [--minutes 60] [--cores 0,1] [--threads 2]

The recording is generated (`demo.media.write_conversation`): turns of espeak-ng speech from a pool of
sentences in two deliveries, pauses of 0.6-2.0 s, the face of the speaker changing with the turn and every
seventh turn without a face; its true speech spans are known. The installed `comp-predict --timeline` runs on
it in a fresh process, pinned to `--cores` with `taskset` (the target: 2 cores), while this script reads the
process's peak resident memory (VmHWM in /proc) every second and prints it with the stage the process is in.

Prints: peak RSS (MiB), wall time, real-time factor (wall / recording length), CPU time (user + system, which
a machine busy with other work does not inflate), the stage split the JSON reports, and how many true
utterances were found with both boundaries within 0.3 s. The target: a 60-minute
recording within 2 GB of memory. `--timeout S` stops the run (the peak so far is still printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "examples" / "out" / "run"
SENTENCES = ("The meeting is at three.", "Put the report on the desk.", "The train leaves at noon.",
             "I will send the file tonight.", "It is cloudy today.", "What a lovely surprise, I love it!",
             "We won the match, this is amazing!", "I miss her so much.", "Nobody came to the party.",
             "Get out of my office right now!", "How dare you say that to me?", "Everything feels empty today.",
             "Thank you so much for coming.", "Let us talk about the budget.", "I am not sure that is right.",
             "Could you close the window please?", "That was the best day of my life.",
             "I cannot believe you did that.", "We should leave before it rains.", "My phone is broken again.")
DELIVERIES = ({"pitch": 70, "speed": 180, "amplitude": 120}, {"pitch": 30, "speed": 130, "amplitude": 80})


def generate(path: Path, minutes: float, seed: int = 0) -> list[tuple[float, float]]:
    """A recording of about `minutes` minutes; returns its true speech spans."""
    from demo import media

    rng = random.Random(seed)
    faces = [media.face_image("astronaut"), media.face_image("lfw", index=1), media.face_image("lfw", index=5)]
    no_face = media.no_face_image()
    lengths: dict[tuple[str, int], float] = {}  # seconds of each sentence in each delivery, synthesised once
    turns, total = [], 0.5
    while total < minutes * 60:
        k = len(turns)
        pause = round(rng.uniform(0.6, 2.0), 2)
        text = rng.choice(SENTENCES)
        if (text, k % 2) not in lengths:
            lengths[text, k % 2] = len(media.speak(text, **DELIVERIES[k % 2])) / media.SAMPLE_RATE
        turns.append(media.Turn(text, no_face if k % 7 == 6 else faces[k % 3], pause, **DELIVERIES[k % 2]))
        total += lengths[text, k % 2] + pause
    return media.write_conversation(path, turns, fps=5)


def comp_predict() -> list[str]:
    script = Path(sys.executable).parent / "comp-predict"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from pipeline.cli.predict import main; sys.exit(main())"]


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process so far (/proc/<pid>/stat, clock ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def matched(found: list[tuple[float, float]], truth: list[tuple[float, float]], tol: float = 0.3) -> int:
    """True spans that some found utterance starts and ends within `tol` seconds of."""
    starts = sorted(found)
    hits, j = 0, 0
    for a, b in truth:
        while j < len(starts) and starts[j][0] < a - tol:
            j += 1
        if j < len(starts) and abs(starts[j][0] - a) <= tol and abs(starts[j][1] - b) <= tol:
            hits += 1
    return hits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="run folder or checkpoint (make demo writes one)")
    p.add_argument("--minutes", type=float, default=60.0, help="length of the generated recording")
    p.add_argument("--cores", default="0,1", help="CPU cores to pin comp-predict to (taskset -c); '' = no pinning")
    p.add_argument("--threads", type=int, default=2, help="comp-predict --threads")
    p.add_argument("--device", default="cpu", help="comp-predict --device")
    p.add_argument("--recording", type=Path, help="use (or keep) the recording at this path")
    p.add_argument("--timeout", type=float, default=0, help="stop comp-predict after this many seconds (0: never)")
    args = p.parse_args()
    if not args.model.exists():
        sys.exit(f"{args.model}: no checkpoint; run `make demo` first or pass --model RUN")

    with tempfile.TemporaryDirectory(prefix="comp-timeline-") as tmp:
        recording = args.recording or Path(tmp) / "recording.mp4"
        spans_file = recording.with_suffix(".spans.json")
        t0 = time.perf_counter()
        if recording.exists() and spans_file.exists():
            spans = [tuple(s) for s in json.loads(spans_file.read_text())]
        else:
            spans = generate(recording, args.minutes)
            spans_file.write_text(json.dumps(spans))
        print(f"recording  {recording} ({recording.stat().st_size / 1e6:.1f} MB, {len(spans)} turns; "
              f"{time.perf_counter() - t0:.0f} s to generate)", flush=True)

        out = Path(tmp) / "timeline.json"
        argv = [*comp_predict(), str(recording), "--model", str(args.model), "--timeline", "--out", str(out),
                "--threads", str(args.threads), "--device", args.device, "-v"]
        if args.cores and shutil.which("taskset"):
            argv = ["taskset", "-c", args.cores, *argv]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        stage = {"line": ""}

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                if "comp-predict:" in line or "pipeline.timeline" in line:
                    stage["line"] = line.strip()[-100:]

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        peak, last_print = 0.0, 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # rusage: the CPU time it used, all threads
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            peak = max(peak, vm_hwm_mb(proc.pid) or 0.0)
            now = time.perf_counter() - t0
            if now - last_print >= 30:
                print(f"  {now:6.0f} s  peak RSS {peak:7.1f} MiB  cpu {cpu_seconds(proc.pid):7.1f} s  {stage['line']}",
                      flush=True)
                last_print = now
            if args.timeout and now > args.timeout:
                proc.kill()
                print(f"stopped after {now:.0f} s (--timeout); peak RSS so far {peak:.1f} MiB")
                return 1
            time.sleep(1.0)
        wall = time.perf_counter() - t0
        cpu = usage.ru_utime + usage.ru_stime
        peak = max(peak, usage.ru_maxrss / 1024)  # kB on Linux
        reader.join(timeout=5)
        if proc.returncode not in (0, 1):
            print(f"comp-predict failed (exit {proc.returncode}): {stage['line']}")
            return 1
        result = json.loads(out.read_text(encoding="utf-8"))
        found = [(u["start"], u["end"]) for u in result["utterances"]]
        duration = float(result["duration_s"])
        predicted = sum(u["prediction"] is not None for u in result["utterances"])
        print(f"recording  {duration / 60:.1f} min, {len(spans)} true utterances")
        print(f"found      {len(found)} utterances, {predicted} predicted; {matched(found, spans)} of the true ones "
              f"with both boundaries within 0.3 s")
        print(f"context    used={result['context']['used']} windows={result['context']['windows']} "
              f"max_len={result['context']['max_len']}")
        print(f"peak RSS   {peak:.0f} MiB  (comp-predict process, VmHWM)")
        print(f"wall       {wall:.0f} s on cores {args.cores or 'all'} ({args.threads} threads, {args.device}): "
              f"real-time factor {wall / duration:.3f}")
        print(f"cpu        {cpu:.0f} s user+sys: {cpu / duration:.3f} CPU-seconds per second of recording "
              f"(what the wall time is on dedicated cores with one thread; a busy machine inflates only the wall)")
        print(f"stages     {result['timings_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
