"""Draw every Grafana panel of k8s/grafana/ from a real run, for docs/operations.md.

No Grafana server installs from the package registries this project can reach, so
this draws the series Grafana would show: a real Prometheus (Debian's `prometheus`)
scrapes a local Ray cluster through k8s/prometheus/prometheus-local.yaml while the
video and coder apps of configs/local.yaml serve a mixed load, then a short GRPO+
run (configs/train/tiny-cpu.yaml) trains on the same cluster. Every panel's PromQL
from k8s/dashboards.py is then evaluated with Prometheus's `query_range` API and
drawn with matplotlib in the dashboard's grid.

    apt-get install prometheus && pip install -e '.[docs]'
    python -m k8s.snapshot                 # writes docs/img/{video,coder,training}.png

It fails if Prometheus rejects a panel's query or a panel has no series, so a
dashboard that draws nothing cannot be committed as a picture.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from api.serve_configs import serve_application
from common.paths import PROJECT_ROOT
from common.spmd import free_port
from k8s.dashboards import DASHBOARDS

LOCAL_SCRAPE_CONFIG = PROJECT_ROOT / "k8s/prometheus/prometheus-local.yaml"
VIDEO_MIX = [("wan-tiny", "240p"), ("cogvideox-tiny", "360p"), ("mochi-tiny", "240p"), ("wan-tiny", "360p"),
             ("cogvideox-tiny", "240p"), ("mochi-tiny", "360p")]
CODER_PROMPTS = ["def fibonacci(n):", "class LRUCache:", "def parse_csv(text):", "import heapq\n\ndef dijkstra("]


@dataclass
class Series:
    legend: str
    times: list[float]
    values: list[float]


def prometheus_config(scrape_interval: str) -> dict:
    """The local scrape config, with a shorter interval and every target moved to loopback.

    Ray's file_sd list names the node's own address; on one machine the same ports
    answer on 127.0.0.1, and this script sends traffic to loopback only.
    """
    config = yaml.safe_load(LOCAL_SCRAPE_CONFIG.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    for job in config["scrape_configs"]:
        job["relabel_configs"] = [{"source_labels": ["__address__"], "regex": r"[^:]+:(\d+)",
                                   "target_label": "__address__", "replacement": "127.0.0.1:$1"}]
    return config


def wait_until(check, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {seconds:.0f} s")


def start_prometheus(workdir: Path, port: int) -> subprocess.Popen:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("k8s.snapshot needs the Prometheus server: apt-get install prometheus")
    config = workdir / "prometheus.yaml"
    config.write_text(yaml.safe_dump(prometheus_config("2s")))
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"))
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/-/ready").status_code == 200, 60, "Prometheus")
    return proc


def deploy_local_apps(http_port: int) -> None:
    """configs/local.yaml's two applications, on a free HTTP port."""
    from ray import serve

    from serve_graph.app import build_video_app
    from serve_graph.coder_app import build_coder_app

    video, coder = serve_application("video"), serve_application("coder")
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(build_video_app(video["args"]), name="video", route_prefix=video["route_prefix"])
    serve.run(build_coder_app(coder["args"]), name="coder", route_prefix=coder["route_prefix"])


def video_load(client: httpx.Client, start: float, seconds: float) -> None:
    """Poisson arrivals of a model/resolution/step-count mix: 1 job/s, a 5 jobs/s burst in
    the middle third (the pool fills and SRPTF reorders), then 1 job/s."""
    rng = random.Random(0)
    mix = itertools.cycle(VIDEO_MIX)
    while (elapsed := time.time() - start) < seconds:
        model, resolution = next(mix)
        client.post("/v1/videos", json={"model": model, "prompt": f"a red fox, take {rng.random():.3f}",
                                        "resolution": resolution, "num_inference_steps": rng.choice([8, 16, 30])})
        rate = 5.0 if seconds / 3 <= elapsed < 2 * seconds / 3 else 1.0
        time.sleep(rng.expovariate(rate))


def image_load(client: httpx.Client, start: float, seconds: float) -> None:
    """One blocking sd3-tiny image request after another (they share the step scheduler)."""
    while time.time() - start < seconds:
        client.post("/v1/images/generations", json={"model": "sd3-tiny", "prompt": "a lighthouse", "n": 2,
                                                    "size": "128x128"})
        time.sleep(1.0)


def coder_load(client: httpx.Client, start: float, seconds: float, worker: int) -> None:
    for i in itertools.count():
        if time.time() - start >= seconds:
            return
        prompt = CODER_PROMPTS[(worker + i) % len(CODER_PROMPTS)]
        with client.stream("POST", "/coder/v1/completions",
                            json={"model": "tiny-coder", "prompt": prompt, "max_tokens": 96 + 32 * (i % 4),
                                  "stream": True}) as response:
            response.read()


def serve_mixed_load(http_port: int, seconds: float) -> None:
    start = time.time()
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=120) as client:
        threads = [threading.Thread(target=load, args=(client, start, seconds)) for load in (video_load, image_load)]
        threads += [threading.Thread(target=coder_load, args=(client, start, seconds, w)) for w in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def train_briefly(workdir: Path, steps: int) -> None:
    """A short tiny-cpu GRPO+ run that joins the running cluster (RAY_ADDRESS=auto)."""
    config = yaml.safe_load((PROJECT_ROOT / "configs/train/tiny-cpu.yaml").read_text())
    config.update(name="snapshot", steps=steps, storage_path=str(workdir / "runs"))
    path = workdir / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "training.train", "--config", str(path)], cwd=PROJECT_ROOT, check=True,
                   env={**os.environ, "RAY_ADDRESS": "auto"})


def query_range(prom: str, expr: str, start: float, end: float, step_s: float) -> list[tuple[dict, list]]:
    response = httpx.get(f"{prom}/api/v1/query_range", params={"query": expr, "start": start, "end": end,
                                                               "step": step_s})
    body = response.json()
    if body.get("status") != "success":
        raise SystemExit(f"Prometheus rejected {expr!r}: {body.get('error')}")
    return [(r["metric"], r["values"]) for r in body["data"]["result"]]


def legend(fmt: str, labels: dict) -> str:
    for key, value in labels.items():
        fmt = fmt.replace("{{" + key + "}}", value)
    return fmt


def panel_series(prom: str, panel: dict, start: float, end: float) -> list[Series]:
    series = []
    for target in panel["targets"]:
        for labels, values in query_range(prom, target["expr"], start, end, 5):
            points = [(float(t) - start, float(v)) for t, v in values if math.isfinite(float(v))]
            if points:
                series.append(Series(legend(target["legendFormat"], labels), *map(list, zip(*points))))
    return series


def draw(dashboard: dict, series: list[list[Series]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    panels = dashboard["panels"]
    rows = math.ceil(len(panels) / 2)
    plt.style.use("dark_background")
    fig, axes = plt.subplots(rows, 2, figsize=(15, 3.1 * rows), squeeze=False)
    fig.suptitle(dashboard["title"], x=0.01, ha="left", fontsize=14)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for panel, lines in zip(panels, series):
        grid = panel["gridPos"]
        ax = axes[grid["y"] // 8][grid["x"] // 12]
        ax.set_facecolor("#181b1f")
        for line in lines:
            ax.plot([t / 60 for t in line.times], line.values, label=line.legend, linewidth=1.4)
        unit = panel["fieldConfig"]["defaults"]["unit"]
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        elif unit == "s":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"))
        elif unit == "reqps":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g} req/s"))
        ax.set_title(panel["title"], loc="left", fontsize=10)
        ax.grid(color="#2c3235", linewidth=0.6)
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="upper left", frameon=False, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="#111217")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs/img")
    parser.add_argument("--serve-seconds", type=float, default=180)
    parser.add_argument("--train-steps", type=int, default=12)
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per load request otherwise

    import ray
    from ray import serve

    workdir = Path(tempfile.mkdtemp(prefix="dit-snapshot-"))
    metrics_port, prom_port, http_port = free_port(), free_port(), free_port()
    subprocess.run(["ray", "start", "--head", "--num-cpus=2", f"--metrics-export-port={metrics_port}",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=true"], check=True, stdout=subprocess.DEVNULL)
    prometheus = None
    try:
        prometheus = start_prometheus(workdir, prom_port)
        prom = f"http://127.0.0.1:{prom_port}"
        ray.init(address="auto", log_to_driver=False)
        deploy_local_apps(http_port)
        serve_start = time.time()
        serve_mixed_load(http_port, args.serve_seconds)
        time.sleep(30)  # the last jobs finish and Ray's metrics agent exports them
        serve_end = time.time()
        serve.shutdown()
        ray.shutdown()
        train_start = time.time()
        train_briefly(workdir, args.train_steps)
        time.sleep(15)
        train_end = time.time()

        windows = {"video.json": (serve_start, serve_end), "coder.json": (serve_start, serve_end),
                   "training.json": (train_start, train_end)}
        args.out.mkdir(parents=True, exist_ok=True)
        empty = []
        for name, build in DASHBOARDS.items():
            dashboard = build()
            series = [panel_series(prom, panel, *windows[name]) for panel in dashboard["panels"]]
            empty += [f"{name}: {p['title']}" for p, s in zip(dashboard["panels"], series) if not s]
            picture = args.out / name.replace(".json", ".png")
            draw(dashboard, series, picture)
            print(f"{name}: {sum(map(len, series))} series in {len(series)} panels -> {picture}")
        if empty:
            raise SystemExit("panels without data: " + "; ".join(empty))
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        subprocess.run(["ray", "stop", "--force"], check=False, stdout=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
