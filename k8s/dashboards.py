"""Grafana dashboards of the project (video serving, coder LLM, GRPO+ training), rendered to JSON.

    python -m k8s.dashboards        # rewrites k8s/grafana/*.json

Panels query the metrics the apps really export (Ray prefixes them with `ray_`):
the video graph's `dit_*` (deployments/metrics.py), vLLM's engine metrics exported
by Ray Serve LLM (`ray_vllm_*`), Serve's HTTP metrics, and the trainer's `grpo_*`
gauges (training/metrics.py). tests/test_k8s_metrics.py scrapes a live local run and
fails if a panel names a metric that is not exported.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    legend = " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(",") if label.strip())
    return [(f"histogram_quantile({q}, sum(rate({metric}_bucket[5m])) by ({group}))", f"p{int(q * 100)} {legend}".strip())
            for q in qs]


def _panel(title: str, targets: list[tuple[str, str]], unit: str, index: int) -> dict:
    return {
        "type": "timeseries", "title": title, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i), "datasource": DATASOURCE}
                    for i, (expr, legend) in enumerate(targets)],
    }


def _dashboard(uid: str, title: str, panels: list[tuple[str, list[tuple[str, str]], str]]) -> dict:
    return {
        "uid": uid, "title": title, "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["dit-serve"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": [_panel(t, targets, unit, i) for i, (t, targets, unit) in enumerate(panels)],
    }


def video() -> dict:
    return _dashboard("dit-serve-video", "DiT-Serve: video and image serving", [
        ("Pool: queued and active requests", [("sum(ray_dit_queue_length)", "queued"),
                                              ("sum(ray_dit_active_requests)", "in pool")], "short"),
        ("Requests per step", _quantiles("ray_dit_batch_size", qs=(0.5, 0.95)), "short"),
        ("Transformer tokens per step", _quantiles("ray_dit_batch_tokens", qs=(0.5, 0.95)), "short"),
        ("Step time", _quantiles("ray_dit_step_duration_seconds"), "s"),
        ("Packing: transformer forwards and distinct shapes per step",
         [*_quantiles("ray_dit_forwards_per_step", qs=(0.5, 0.99)),
          *[(expr, f"shapes {legend}") for expr, legend in _quantiles("ray_dit_step_shapes", qs=(0.5, 0.99))]],
         "short"),
        ("Worker idle gap between forwards (requests waiting)", _quantiles("ray_dit_step_gap_seconds"), "s"),
        ("StepPlan size", _quantiles("ray_dit_plan_bytes", qs=(0.5, 0.99)), "bytes"),
        ("Request latency by model and resolution", _quantiles("ray_dit_request_latency_seconds", "model, resolution",
                                                               (0.5, 0.95)), "s"),
        ("Job completion time by model and resolution",
         _quantiles("ray_dit_job_completion_seconds", "model, resolution", (0.5, 0.95, 0.99)), "s"),
        ("Time to first step by model", _quantiles("ray_dit_time_to_first_step_seconds", "model", (0.5, 0.95)), "s"),
        ("Job latency breakdown: mean seconds per stage",
         [("sum(rate(ray_dit_stage_seconds_sum[5m])) by (stage) / sum(rate(ray_dit_stage_seconds_count[5m])) "
           "by (stage)", "{{stage}}")], "s"),
        ("Worker group: busy fraction per rank", [("sum(rate(ray_dit_rank_busy_seconds_total[1m])) by (rank)",
                                                   "rank {{rank}}")], "percentunit"),
        ("Brick rings: ring size per row, KV traffic",
         [("sum(rate(ray_dit_ring_size_bucket[5m])) by (le)", "rows per s, ring <= {{le}}"),
          ("sum(rate(ray_dit_ring_bytes_total[1m]))", "KV bytes/s")], "short"),
        ("Step caches: cached steps per second, requests per step computed vs cached",
         [("sum(rate(ray_dit_cache_hits_total[5m])) by (model, mode)", "cached steps/s {{model}} {{mode}}"),
          ("sum(rate(ray_dit_step_requests_sum[5m])) by (kind) / sum(rate(ray_dit_step_requests_count[5m])) by (kind)",
           "mean {{kind}} requests per step")], "short"),
        ("Worker group restarts", [("sum(increase(ray_dit_group_restarts_total[15m]))", "restarts")], "short"),
        ("Jobs by model and status", [("sum(rate(ray_dit_jobs_total[5m])) by (model, status)",
                                       "{{model}} {{status}}")], "reqps"),
        ("Finished requests by status", [("sum(rate(ray_dit_requests_finished_total[5m])) by (status)",
                                          "{{status}}")], "reqps"),
    ])


def coder() -> dict:
    return _dashboard("dit-serve-coder", "DiT-Serve: coder LLM (vLLM)", [
        ("Generated tokens per second", [("sum(rate(ray_vllm_generation_tokens_total[1m]))", "generated"),
                                         ("sum(rate(ray_vllm_prompt_tokens_total[1m]))", "prompt")], "short"),
        ("Time to first token", _quantiles("ray_vllm_time_to_first_token_seconds", qs=(0.5, 0.95, 0.99)), "s"),
        ("Inter-token latency", _quantiles("ray_vllm_inter_token_latency_seconds", qs=(0.5, 0.95)), "s"),
        ("End-to-end request latency", _quantiles("ray_vllm_e2e_request_latency_seconds", qs=(0.5, 0.95)), "s"),
        ("Running and waiting requests", [("sum(ray_vllm_num_requests_running)", "running"),
                                          ("sum(ray_vllm_num_requests_waiting)", "waiting")], "short"),
        ("KV cache usage", [("max(ray_vllm_kv_cache_usage_perc)", "usage")], "percentunit"),
        ("HTTP requests by application", [("sum(rate(ray_serve_num_http_requests_total[1m])) by (application)",
                                           "{{application}}")], "reqps"),
    ])


def training() -> dict:
    def gauge(name: str, legend: str) -> tuple[str, str]:
        return f"max(ray_grpo_{name}) by (run)", f"{{{{run}}}} {legend}"

    return _dashboard("dit-serve-training", "DiT-Serve: GRPO+ training", [
        ("Reward", [gauge("mean_reward", "train"), gauge("held_out_reward", "held-out")], "percentunit"),
        ("Response length", [gauge("response_tokens", "mean"), gauge("max_response_tokens", "limit")], "short"),
        ("Step time by phase", [("max(ray_grpo_phase_seconds) by (run, phase)", "{{run}} {{phase}}")], "s"),
        ("Groups with signal, clip fraction, truncation", [gauge("groups_with_signal", "signal"),
                                                           gauge("clip_fraction", "clipped"),
                                                           gauge("truncated", "truncated")], "percentunit"),
        ("Entropy", [gauge("entropy", "entropy")], "short"),
        ("Staleness and step", [gauge("staleness", "staleness"), gauge("step", "step")], "short"),
    ])


DASHBOARDS = {"video.json": video, "coder.json": coder, "training.json": training}


def dump(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2) + "\n"


def main() -> None:
    for name, build in DASHBOARDS.items():
        (OUT / name).write_text(dump(build()))
        print(f"wrote k8s/grafana/{name}")


if __name__ == "__main__":
    main()
