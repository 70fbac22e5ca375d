# omopfl image: the CLI, the Flower ClientApp/ServerApp and the SuperNode entry point.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# Point this at a CPU-only PyTorch index to avoid the multi-GB CUDA build (see README).
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY omopfl ./omopfl
COPY cohorts ./cohorts
COPY sql ./sql
COPY adapters ./adapters
COPY examples ./examples
# The runtime user (numeric, so that the host and Kubernetes can check it is not root) and /data, the
# volume's mount point: Docker copies this folder's owner into a new named volume, so synth, prepare,
# and the server's run directory can write there.
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 --user-group omopfl \
    && mkdir -p /data \
    && chown 10001:10001 /data
USER 10001:10001
ENTRYPOINT []
CMD ["omopfl", "--help"]
