"""Render the KubeRay manifests from the project's configs, so that they cannot drift.

    python -m k8s.render            # rewrites k8s/rayservice.yaml and k8s/rayjob-grpo.yaml

- `rayservice.yaml` (RayService, ray.io/v1): `serveConfigV2` is configs/gpu.yaml
  verbatim (the video, coder and dLLM apps); a CPU-only head (`num-cpus: "0"`), a worker
  group of 8-GPU pods for the DiT workers (Brick rings of 1/2/4/8 fit one node), one
  for the vLLM coder replicas and one of 1-GPU pods for the diffusion coder LMs (their
  checkpoints on the `dit-serve-models` volume at /models), autoscaling bounds, `nvidia.com/gpu` resources,
  health probes and the metrics port.
- `rayjob-grpo.yaml` (RayJob): the GRPO+ run of configs/train/deepcoder-14b-served.yaml,
  submitted to the RayService's cluster (`clusterSelector` on the label KubeRay puts
  on clusters it creates for a RayService), where it samples through the coder app and
  syncs that app's weights in memory.
tests/test_k8s.py checks the committed files equal this rendering and validates
them against KubeRay v1.7.0's CRD schemas and ServeDeploySchema.
"""

from __future__ import annotations

import yaml

from common.paths import PROJECT_ROOT

IMAGE = "ghcr.io/dit-serve/dit-serve:0.1.0-gpu"  # built by ./Dockerfile
RAY_VERSION = "2.60.0"
SERVICE_NAME = "dit-serve"
PORTS = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
         {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"},
         {"containerPort": 8080, "name": "metrics"}]
# KubeRay's own health endpoints: the raylet via the dashboard agent, Serve's proxy.
RAYLET_HEALTH = {"httpGet": {"path": "/api/local_raylet_healthz", "port": 52365},
                 "initialDelaySeconds": 30, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6}
SERVE_HEALTH = {"httpGet": {"path": "/-/healthz", "port": 8000},
                "initialDelaySeconds": 30, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6}


def _container(name: str, cpu: str, memory: str, gpus: int, extra_env: list | None = None) -> dict:
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return {
        "name": name, "image": IMAGE,
        "ports": PORTS if name == "ray-head" else [{"containerPort": 8080, "name": "metrics"}],
        "resources": {"limits": limits, "requests": dict(limits)},
        "env": [{"name": "CODER_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "dit-serve-admin",
                                                                               "key": "token"}}},
                # The video app's job store (PostgreSQL) and blob store (object storage) URLs.
                *({"name": env, "valueFrom": {"secretKeyRef": {"name": "dit-serve-store", "key": key}}}
                  for env, key in (("DIT_JOBS_URL", "jobs_url"), ("DIT_BLOBS_URL", "blobs_url"))),
                *(extra_env or [])],
        "livenessProbe": RAYLET_HEALTH, "readinessProbe": SERVE_HEALTH if name == "ray-head" else RAYLET_HEALTH,
    }


def _worker_group(name: str, gpus: int, replicas: tuple[int, int], cpu: str, memory: str,
                  models_volume: bool = False) -> dict:
    """`models_volume`: mount the `dit-serve-models` claim read-only at /models (checkpoints served by path)."""
    low, high = replicas
    container = _container("ray-worker", cpu, memory, gpus)
    volumes = []
    if models_volume:
        container["volumeMounts"] = [{"name": "models", "mountPath": "/models", "readOnly": True}]
        volumes = [{"name": "models", "persistentVolumeClaim": {"claimName": "dit-serve-models", "readOnly": True}}]
    return {
        "groupName": name, "replicas": low, "minReplicas": low, "maxReplicas": high,
        "rayStartParams": {"num-gpus": str(gpus), "metrics-export-port": "8080",
                           "resources": f'"{{\\"{name}\\": 1}}"'},
        "template": {"spec": {"containers": [container],
                              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                               "effect": "NoSchedule"}],
                              **({"volumes": volumes} if volumes else {})}},
    }


def render_rayservice() -> dict:
    serve_config = (PROJECT_ROOT / "configs" / "gpu.yaml").read_text()
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": SERVICE_NAME, "labels": {"app.kubernetes.io/name": SERVICE_NAME}},
        "spec": {
            "serveConfigV2": serve_config,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"idleTimeoutSeconds": 300, "upscalingMode": "Default"},
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": "8080"},
                    "template": {"spec": {"containers": [_container("ray-head", "8", "32Gi", 0)]}},
                },
                "workerGroupSpecs": [
                    # DiT workers: 8 GPUs per pod so Brick rings of 1/2/4/8 stay inside one node.
                    _worker_group("dit-gpu", gpus=8, replicas=(1, 4), cpu="64", memory="512Gi"),
                    # vLLM coder replicas (DeepCoder-14B, tensor parallel 2).
                    _worker_group("vllm-gpu", gpus=2, replicas=(1, 4), cpu="16", memory="128Gi"),
                    # The diffusion coder LMs (Dream-Coder 7B + DiffuCoder 7B on one GPU), checkpoints by path.
                    _worker_group("dllm-gpu", gpus=1, replicas=(1, 2), cpu="8", memory="64Gi", models_volume=True),
                    # The GRPO+ trainer of k8s/rayjob-grpo.yaml: 8 FSDP workers on one node, up only while it runs.
                    _worker_group("train-gpu", gpus=8, replicas=(0, 1), cpu="64", memory="1024Gi"),
                ],
            },
        },
    }


def render_rayjob() -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": "grpo-deepcoder-14b", "labels": {"app.kubernetes.io/name": SERVICE_NAME}},
        "spec": {
            "entrypoint": "python -m training.train --config configs/train/deepcoder-14b-served.yaml",
            # Submit to the RayService's cluster instead of creating one.
            "clusterSelector": {"ray.io/originated-from-cr-name": SERVICE_NAME},
            "submissionMode": "K8sJobMode",
            "backoffLimit": 0,
            "runtimeEnvYAML": "working_dir: /app\nenv_vars:\n  TOKENIZERS_PARALLELISM: \"false\"\n",
        },
    }


MANIFESTS = {"rayservice.yaml": render_rayservice, "rayjob-grpo.yaml": render_rayjob}


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, runtimeEnvYAML) as readable `|` blocks."""


_BlockDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_BlockDumper, sort_keys=False, width=120)


def main() -> None:
    for name, render in MANIFESTS.items():
        (PROJECT_ROOT / "k8s" / name).write_text(f"# Rendered by `python -m k8s.render` from configs/; do not edit.\n"
                                         f"{dump(render())}")
        print(f"wrote k8s/{name}")


if __name__ == "__main__":
    main()
