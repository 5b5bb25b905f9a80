"""KubeRay manifests: rendered from configs/ (no drift), valid against KubeRay v1.7.0's CRDs and ServeDeploySchema."""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from api.coder_config import CoderAppConfig
from api.config import VideoAppConfig
from api.dllm_config import DllmAppConfig
from k8s.render import MANIFESTS, dump

ROOT = Path(__file__).resolve().parents[1]
CRDS = Path(os.environ.get("KUBERAY_CRDS_DIR", ROOT.parent / "shared" / "kuberay-crds"))
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / CRD_FILES[kind]).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module", params=sorted(MANIFESTS))
def manifest(request):
    path = ROOT / "k8s" / request.param
    return request.param, yaml.safe_load(path.read_text()), path.read_text()


def test_committed_manifest_equals_its_rendering(manifest):
    name, _, text = manifest
    assert text.split("\n", 1)[1] == dump(MANIFESTS[name]()), f"k8s/{name} is stale: run python -m k8s.render"


@pytest.mark.skipif(not CRDS.is_dir(), reason="KubeRay CRDs not found; set KUBERAY_CRDS_DIR")
def test_manifest_validates_against_the_kuberay_crd(manifest):
    _, data, _ = manifest
    assert data["apiVersion"] == "ray.io/v1"
    jsonschema.validate(data, _schema(data["kind"]))


@pytest.mark.skipif(not CRDS.is_dir(), reason="KubeRay CRDs not found; set KUBERAY_CRDS_DIR")
def test_schema_check_catches_a_broken_manifest():
    service = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="minReplicas|'one'"):
        jsonschema.validate(service, _schema("RayService"))


def test_rayservice_serves_the_gpu_config_on_pods_that_hold_its_apps():
    """The RayService serves configs/gpu.yaml verbatim, on worker groups whose GPUs hold what each app asks for,
    with the stores' URLs, probes and a metrics port on every pod."""
    service = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())
    assert service["spec"]["serveConfigV2"] == (ROOT / "configs" / "gpu.yaml").read_text()
    serve = ServeDeploySchema(**yaml.safe_load(service["spec"]["serveConfigV2"]))
    apps = {a.name: a for a in serve.applications}
    video = VideoAppConfig(**apps["video"].args)
    assert video.store.jobs_url.startswith("${") and video.ingress_replicas >= 2  # a shared store; any replica
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert all(g["minReplicas"] <= g["maxReplicas"] for g in groups.values())

    def gpus(group: str) -> int:
        limits = groups[group]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == groups[group]["rayStartParams"]["num-gpus"]
        return int(limits["nvidia.com/gpu"])

    ranks = video.worker_group
    assert gpus("dit-gpu") >= math.ceil(ranks.ranks * ranks.num_gpus_per_rank)  # one group fits one pod
    assert ranks.num_gpus_per_rank > 0.5  # no two ranks share a GPU
    assert max(gpus(g) for g in groups) >= CoderAppConfig(**apps["coder"].args).tensor_parallel_size
    dllm = DllmAppConfig(**apps["dllm"].args)
    assert gpus("dllm-gpu") >= dllm.step_scheduler.num_gpus
    dllm_pod = groups["dllm-gpu"]["template"]["spec"]
    [mount] = dllm_pod["containers"][0]["volumeMounts"]
    assert all(m.source.startswith(mount["mountPath"] + "/") for m in dllm.models)  # checkpoints on the volume
    assert dllm_pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    for container in [cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
                      *(g["template"]["spec"]["containers"][0] for g in groups.values())]:
        assert container["livenessProbe"] and container["readinessProbe"]
        assert {e["name"] for e in container["env"]} >= {"DIT_JOBS_URL", "DIT_BLOBS_URL"}
        assert any(p["name"] == "metrics" for p in container["ports"])


def test_rayjob_runs_the_recipe_on_the_service_cluster():
    job = yaml.safe_load((ROOT / "k8s" / "rayjob-grpo.yaml").read_text())
    assert job["spec"]["entrypoint"].endswith("configs/train/deepcoder-14b-served.yaml")  # trains the served coder
    assert (ROOT / "configs/train/deepcoder-14b-served.yaml").exists()
    assert job["spec"]["clusterSelector"] == {"ray.io/originated-from-cr-name": "dit-serve"}


def test_dockerfile_builds_the_manifests_image_on_the_pinned_ray():
    """The image named in the manifests comes from ./Dockerfile: same Ray version, every package copied."""
    from k8s.render import IMAGE

    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray[")).split("==")[1]
    base = next(line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{ray_pin}-py311-") and base.endswith("-gpu")
    copied = {line.split()[-1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"configs"} <= copied
    assert f"docker build -t {IMAGE} ." in dockerfile


def test_snapshot_scrapes_rays_file_sd_list_on_loopback_only():
    import re

    from k8s.snapshot import legend, prometheus_config

    config = prometheus_config("2s")
    job = config["scrape_configs"][0]
    assert config["global"]["scrape_interval"] == "2s"
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    rule = job["relabel_configs"][0]
    # Prometheus anchors relabel regexes and writes $1 as the first group.
    rewrite = re.fullmatch(rule["regex"], "192.0.2.2:44217").expand(rule["replacement"].replace("$1", r"\1"))
    assert (rule["source_labels"], rule["target_label"], rewrite) == (["__address__"], "__address__",
                                                                      "127.0.0.1:44217")
    assert legend("p95 {{model}} {{resolution}}", {"model": "wan-tiny", "resolution": "720p"}) == "p95 wan-tiny 720p"
