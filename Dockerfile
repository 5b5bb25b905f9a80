# The image the KubeRay manifests run (IMAGE in k8s/render.py): Ray's GPU image of the
# pinned Ray version, plus this project with the official vLLM and flash-attn kernels.
#   docker build -t ghcr.io/dit-serve/dit-serve:0.1.0-gpu . && docker push ghcr.io/dit-serve/dit-serve:0.1.0-gpu
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /home/ray/dit-serve
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users common common
COPY --chown=ray:users api api
COPY --chown=ray:users serve_graph serve_graph
COPY --chown=ray:users deployments deployments
COPY --chown=ray:users engine engine
COPY --chown=ray:users models models
COPY --chown=ray:users attention attention
COPY --chown=ray:users training training
COPY --chown=ray:users benchmarks benchmarks
COPY --chown=ray:users k8s k8s
COPY --chown=ray:users configs configs
RUN pip install --no-cache-dir -e '.[gpu]'
