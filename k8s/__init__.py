"""KubeRay manifests of the project, rendered from configs/ (see k8s/render.py)."""
