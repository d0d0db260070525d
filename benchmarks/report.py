"""One report over every benchmark: runs them (or re-reads their JSON) and writes
benchmarks/REPORT.md with plots in benchmarks/results/report_*.png.

Each benchmark in benchmarks/ writes benchmarks/results/NAME.json (and its own PNG); this
script runs whichever exist, then compares every figure with its target (pass/fail), draws
the cross-benchmark plots (latency CDF per path, FPS, lip-sync offsets, sessions vs latency,
fail-over gaps) and records the machine it ran on.

    python benchmarks/report.py                      # run every benchmark, then report
    python benchmarks/report.py --only e2e,render    # run these, report on all results
    python benchmarks/report.py --skip load,faults
    python benchmarks/report.py --from-results       # re-read results/*.json, run nothing
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
REPORT = BENCH / "REPORT.md"

# Run order: cheap single-process figures first, whole-stack ones last. Extra arguments
# keep a full run within about an hour on 2 cores; each benchmark's own flags go further.
ORDER: list[tuple[str, list[str]]] = [
    ("tts", []), ("align", []), ("motion", []), ("render", []), ("bus", []), ("replay", []),
    ("e2e", []), ("load", []), ("faults", []), ("long_session", ["--minutes", "3"]),
]


@dataclasses.dataclass(frozen=True)
class Target:
    bench: str
    figure: str  # key in the benchmark's JSON
    check: str  # "<= 200", ">= 100", "== 0", "abs <= 10", "in 8..21"
    what: str

    def judge(self, value: Any) -> bool | None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        op, _, bound = self.check.partition(" ")
        if op == "abs":
            value, (op, _, bound) = abs(value), bound.partition(" ")
        if op == "in":
            lo, hi = (float(x) for x in bound.split(".."))
            return lo <= value <= hi
        b = float(bound)
        return {"<=": value <= b, ">=": value >= b, "==": value == b}[op]


TARGETS = [
    Target("tts", "first_chunk_ms", "<= 40", "reply in -> first speech chunk out (p95)"),
    Target("align", "onset_median_ms", "<= 20", "phoneme onset error, median"),
    Target("align", "onset_p90_ms", "<= 50", "phoneme onset error, p90"),
    Target("align", "rtf", "<= 0.05", "real-time factor"),
    Target("motion", "frames_per_s", ">= 1000", "motion frames/s at 100 fps"),
    Target("motion", "chunk_latency_ms", "<= 60", "motion chunk latency"),
    Target("motion", "bilabial_closure", ">= 0.95", "p/b/m closures"),
    Target("motion", "blinks_per_min", "in 8..21", "idle blinks per minute"),
    Target("render", "fps_512_one_session", ">= 100", "render+encode fps, 512 px, one core"),
    Target("render", "fps_512_two_sessions_total", ">= 200", "two sessions, two processes"),
    Target("render", "limit_ratio", ">= 0.8", "vs one grid_sample + encoder"),
    Target("render", "mem_mb_per_session", "<= 100", "memory per session"),
    Target("render", "mem_growth_pct", "<= 10", "render memory growth"),
    Target("bus", "hop_p99_ms", "<= 5", "runtime relay hop p99"),
    Target("bus", "hop_over_raw_p99", "<= 1.5", "vs a bare confluent-kafka relay"),
    Target("replay", "export_s_per_10min", "<= 10", "export a 10-minute session"),
    Target("replay", "verify_records_per_s", ">= 50000", "verify throughput"),
    Target("e2e", "text_to_frame_p95_ms", "<= 250", "text -> its first frame at a viewer, p95"),
    Target("e2e", "audio_to_frame_p95_ms", "<= 200", "own audio chunk -> its frame, p95"),
    Target("e2e", "viewer_fps", ">= 24", "fps at the WebRTC viewer"),
    Target("e2e", "av_offset_ms", "abs <= 20", "A/V offset at the viewer (frame matching)"),
    Target("e2e", "lipsync_shift_ms", "abs <= 20", "A/V offset at the viewer (onsets), vs log"),
    Target("load", "max_realtime_sessions", ">= 1", "sessions held in real time, SLO met"),
    Target("faults", "frames_lost", "== 0", "frames lost at the viewer, stage SIGKILLs"),
    Target("faults", "duplicates_delivered", "== 0", "duplicate frames delivered"),
    Target("faults", "max_gap_s", "<= 2", "largest visible gap after a SIGKILL"),
    Target("faults", "broker_restart_lost", "== 0", "acknowledged records lost"),
    Target("faults", "long_session_mem_growth_pct", "<= 10", "long session memory growth"),
    Target("faults", "long_session_offset_drift_ms", "abs <= 10", "long session lip-sync drift"),
    Target("long_session", "long_session_mem_growth_pct", "<= 10", "RSS last vs first window"),
    Target("long_session", "long_session_offset_drift_ms", "abs <= 10",
           "lip-sync offset drift, last vs first window"),
    Target("long_session", "max_pts_gap_s", "<= 1", "largest gap in logged video pts"),
    Target("long_session", "max_arrival_gap_s", "<= 1", "largest gap between frames at a viewer"),
    Target("long_session", "frames_delivered_ratio", ">= 0.95", "frames at a viewer / expected"),
]


def available() -> list[str]:
    return [name for name, _ in ORDER if (BENCH / f"{name}.py").exists()]


def run_benchmarks(names: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Run each benchmark as its own process; a failure is recorded, not fatal."""
    extra = dict(ORDER)
    runs: dict[str, dict[str, Any]] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in names:
        out = RESULTS / f"{name}.json"
        cmd = [sys.executable, str(BENCH / f"{name}.py"), "--json", str(out), *extra[name]]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        runs[name] = {"rc": rc, "seconds": round(time.monotonic() - t0, 1)}
    return runs


def load_results() -> dict[str, dict[str, Any]]:
    out = {}
    for name, _ in ORDER:
        path = RESULTS / f"{name}.json"
        if path.exists():
            try:
                out[name] = json.loads(path.read_text())
            except ValueError:
                continue
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {}
    for mod in ("torch", "numpy", "confluent_kafka", "av", "aiortc", "fastavro"):
        try:
            versions[mod] = str(__import__(mod).__version__)
        except Exception:
            versions[mod] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb,
            "os": platform.platform(), "python": platform.python_version(),
            "load_avg_1min": round(os.getloadavg()[0], 2), **versions}


# ---- plots ------------------------------------------------------------------------------

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdf(res: dict[str, Any], out: Path) -> bool:
    import numpy as np

    e2e = res.get("e2e", {})
    series = [("text -> its first frame (e2e)", e2e.get("text_to_frame_exact_ms")),
              ("own audio chunk -> its frame (e2e)", e2e.get("audio_to_frame_chunks_ms")),
              ("text -> mouth visibly moves (e2e)", e2e.get("text_to_frame_ms")),
              ("speech onset -> mouth visibly moves (e2e)", e2e.get("audio_to_frame_ms"))]
    series = [(label, xs) for label, xs in series if xs]
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, xs in series:
        xs = sorted(xs)
        ax.plot(xs, np.linspace(0, 1, len(xs)), marker=".", label=f"{label} (n={len(xs)})")
    ax.axvline(200, color="red", ls="--", lw=1, label="200 ms target")
    ax.set_xlabel("ms")
    ax.set_ylabel("CDF")
    ax.set_title("latency per path at a WebRTC viewer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_fps(res: dict[str, Any], out: Path) -> bool:
    bars = []
    r = res.get("render", {})
    for key, label, target in (("fps_256_one_session", "render 256 px", None),
                               ("fps_512_one_session", "render 512 px", 100.0),
                               ("fps_768_one_session", "render 768 px", None),
                               ("fps_512_two_sessions_total", "render 512 px, 2 processes",
                                200.0)):
        if isinstance(r.get(key), (int, float)):
            bars.append((label, r[key], target))
    m = res.get("motion", {})
    if isinstance(m.get("frames_per_s"), (int, float)):
        bars.append(("motion model (100 fps)", m["frames_per_s"], 1000.0))
    e = res.get("e2e", {})
    if isinstance(e.get("viewer_fps"), (int, float)):
        bars.append(("WebRTC viewer (e2e)", e["viewer_fps"], 25.0))
    load = res.get("load", {})
    fps_at = [s.get("min_viewer_fps") for s in load.get("steps", []) if s.get("min_viewer_fps")]
    if fps_at:
        bars.append(("worst viewer at max load", min(fps_at), 24.0))
    if not bars:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ys = range(len(bars))
    ax.barh(list(ys), [b[1] for b in bars], color="tab:blue")
    for y, (label, v, target) in zip(ys, bars):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
        if target:
            ax.plot([target, target], [y - 0.4, y + 0.4], color="red", lw=2)
    ax.set_yticks(list(ys), [b[0] for b in bars], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("frames per second (log; red: target)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_lipsync(res: dict[str, Any], out: Path) -> bool:
    e = res.get("e2e", {})
    series = [("viewer, frame matching (e2e)", e.get("av_offsets_ms")),
              ("viewer, mouth vs sound onsets (e2e)", e.get("av_offsets_viewer_ms")),
              ("log, mouth vs sound onsets (e2e)", e.get("av_offsets_log_ms")),
              ("log, jaw vs speech envelope (long session)",
               [u["offset_ms"] for u in res.get("long_session", {}).get("utterance_offsets", [])
                if u.get("offset_ms") is not None])]
    series = [(label, xs) for label, xs in series if xs]
    if not series:
        return False
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    every = [x for _, xs in series for x in xs]
    bins = np.linspace(min(every) - 5, max(every) + 5, 30)  # shared, so bars compare
    for label, xs in series:
        ax.hist(xs, bins=bins, alpha=0.5, label=f"{label} (n={len(xs)})")
    for x in (-20, 20):
        ax.axvline(x, color="red", ls="--", lw=1)
    ax.set_xlabel("lip-sync offset, ms (positive: the mouth after the sound; red: +-20 ms)")
    ax.set_ylabel("utterances")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_sessions(res: dict[str, Any], out: Path) -> bool:
    steps = res.get("load", {}).get("steps", [])
    pts = [(s["sessions"], s.get("worst_session_p95_ms")) for s in steps
           if s.get("worst_session_p95_ms") is not None]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="worst session p95")
    pooled = [(s["sessions"], s.get("pooled_p95_ms")) for s in steps
              if s.get("pooled_p95_ms") is not None]
    if pooled:
        ax.plot([p[0] for p in pooled], [p[1] for p in pooled], marker="s",
                label="all sessions pooled, p95")
    slo = res["load"].get("slo_ms")
    if slo:
        ax.axhline(slo, color="red", ls="--", lw=1, label=f"SLO {slo:g} ms")
    ax.set_xlabel("concurrent live sessions")
    ax.set_xticks(sorted({p[0] for p in pts}))
    ax.set_yscale("log")  # an overloaded step is tens of seconds behind, a good one ~200 ms
    ax.set_ylabel("audio chunk -> frame at viewer, ms (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_failover(res: dict[str, Any], out: Path) -> bool:
    kills = res.get("faults", {}).get("kills", [])
    if not kills:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [k["stage"] for k in kills]
    xs = list(range(len(names)))
    ax.bar([x - 0.2 for x in xs], [k.get("max_gap_s") or 0 for k in kills], 0.4,
           label="largest gap after SIGKILL")
    ax.bar([x + 0.2 for x in xs], [k.get("max_gap_before_kill_s") or 0 for k in kills], 0.4,
           label="largest gap before")
    restart = res["faults"].get("broker_restart", {})
    if restart.get("first_frame_after_restart_s") is not None:
        xs.append(len(names))
        names.append("broker restart")
        ax.bar([xs[-1] - 0.2], [restart["first_frame_after_restart_s"]], 0.4, color="tab:green",
               label="first frame after broker is back")
    ax.axhline(2.0, color="red", ls="--", lw=1, label="2 s target")
    ax.set_xticks(xs, names)
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


PLOTS: list[tuple[str, str, Callable[[dict[str, Any], Path], bool], str]] = [
    ("report_latency_cdf.png", "Latency CDF per path", plot_latency_cdf, "e2e.json"),
    ("report_fps.png", "Frames per second", plot_fps, "render, motion, e2e or load JSON"),
    ("report_lipsync.png", "Lip-sync offset histogram", plot_lipsync,
     "e2e.json or long_session.json"),
    ("report_sessions_latency.png", "Sessions vs latency", plot_sessions, "load.json"),
    ("report_failover.png", "Fail-over gaps", plot_failover, "faults.json"),
]


# ---- the report -------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_report(res: dict[str, Any], mode: str, runs: dict[str, dict[str, Any]]) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m = machine()
    lines = ["# Benchmark report", "",
             f"Generated {now} by `python benchmarks/report.py{mode}`."]
    if not runs:
        lines += ["This report re-reads `benchmarks/results/*.json` (`--from-results`): no "
                  "benchmark was re-run for it (a full run takes too long on the shared 2-core "
                  "machine). Each result's date below is when that benchmark last ran; "
                  "figures were taken on a machine shared with other work, so timings are "
                  "noisy (each JSON records the load average around its run)."]
    lines += ["", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m.items()]
    lines += ["", "## Benchmarks", "", "| benchmark | results file | last run | load avg |",
              "|---|---|---|---|"]
    for name in [n for n, _ in ORDER]:
        path = RESULTS / f"{name}.json"
        if name in res:
            when = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)
            load = res[name].get("load_avg_1min_before")
            run = runs.get(name)
            note = "" if run is None else f" (this run: rc {run['rc']}, {run['seconds']} s)"
            lines.append(f"| `{name}.py` | [{name}.json](results/{name}.json) | "
                         f"{when:%Y-%m-%d %H:%M}{note} | "
                         f"{'not recorded' if load is None else _fmt(load)} |")
        elif (BENCH / f"{name}.py").exists():
            lines.append(f"| `{name}.py` | no results yet | | |")
    lines += ["", "## Targets", "", "| benchmark | figure | what | measured | target | |",
              "|---|---|---|---|---|---|"]
    passed = failed = 0
    for t in TARGETS:
        if t.bench not in res:
            continue
        v = res[t.bench].get(t.figure)
        ok = t.judge(v)
        mark = "pass" if ok else "**fail**" if ok is False else "n/a"
        passed += ok is True
        failed += ok is False
        lines.append(f"| {t.bench} | `{t.figure}` | {t.what} | {_fmt(v)} | {t.check} | {mark} |")
    lines += ["", f"{passed} targets met, {failed} not met.", "", "## Plots", ""]
    for fname, title, draw, source in PLOTS:
        if draw(res, RESULTS / fname):
            lines += [f"### {title}", "", f"![{title}](results/{fname})", ""]
        else:
            lines += [f"### {title}", "", f"No data yet (needs {source}).", ""]
    own = [n for n in res if (RESULTS / f"{n}.png").exists()]
    if own:
        lines += ["### Each benchmark's own plot", ""]
        lines += [f"- `{n}`: ![{n}](results/{n}.png)" for n in own]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-results", action="store_true",
                   help="run nothing: re-read benchmarks/results/*.json")
    p.add_argument("--only", default="", help="comma-separated benchmarks to run")
    p.add_argument("--skip", default="", help="comma-separated benchmarks not to run")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per benchmark")
    p.add_argument("--out", default=str(REPORT))
    args = p.parse_args()
    names = available()
    only = [n for n in args.only.split(",") if n]
    skip = {n for n in args.skip.split(",") if n}
    unknown = (set(only) | skip) - {n for n, _ in ORDER}
    if unknown:
        p.error(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(n for n, _ in ORDER)}")
    runs: dict[str, dict[str, Any]] = {}
    mode = " --from-results"
    if not args.from_results:
        chosen = [n for n in names if (not only or n in only) and n not in skip]
        runs = run_benchmarks(chosen, args.timeout_s)
        mode = "".join(f" --{k} {v}" for k, v in (("only", args.only), ("skip", args.skip)) if v)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = write_report(load_results(), mode, runs)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
