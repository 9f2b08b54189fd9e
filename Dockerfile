# The project image for every node of docker-compose.yml (Ray head, Ray workers, MLflow).
#
# Default (a machine with internet access and GPUs): the official PyTorch CUDA runtime.
# It brings CUDA builds of torch and torchvision; pip keeps them because they satisfy the
# project's requirements (torch>=2.3, torchvision), so nothing CUDA is downloaded twice.
#
# Offline / CPU (what `make cluster-test` builds, see docker-compose.offline.yml):
#   BASE_IMAGE=modloss-base:bookworm-...  Debian bookworm, python 3.11 venv on PATH,
#                                         made locally by .ci/cluster-prereqs.sh
#   TORCH=torch==2.13.0+cpu               found in .whl/ (git-ignored), never CUDA torch
#   EXTRAS=sweep                          no torchvision: PyPI's is built against CUDA torch
#
# Ray and MLflow are pinned to the versions the project is developed and tested with, so
# that `modloss submit` and `modloss report` on a laptop talk to servers of the same version.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG RAY_VERSION=2.60.0
ARG MLFLOW_VERSION=3.17.2
ARG TORCH=
ARG EXTRAS=sweep,vision

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODLOSS_DATA_DIR=/data

WORKDIR /opt/modloss

# TORCH from local wheels first: .whl/ may be absent (the glob then copies only
# constraints.txt, a small file that rarely changes).
COPY constraints.txt .whl* /tmp/wheels/
RUN if [ -n "${TORCH}" ]; then pip install --find-links /tmp/wheels "${TORCH}"; fi \
    && rm -rf /tmp/wheels \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Dependencies next (a layer that survives source and README edits: pyproject.toml needs
# a README.md to exist, the real one comes with the source), then the source.
COPY pyproject.toml ./
RUN touch README.md
COPY modloss/__init__.py modloss/
COPY orchestration/__init__.py orchestration/
COPY dashboards/__init__.py dashboards/
RUN pip install "ray[default,tune,train]==${RAY_VERSION}" "mlflow==${MLFLOW_VERSION}" \
        ".[${EXTRAS}]" \
    && python -c "import torch, ray, mlflow, psycopg2; print('torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)"

COPY README.md ./
COPY modloss/ modloss/
COPY orchestration/ orchestration/
COPY dashboards/ dashboards/
COPY search_spaces/ search_spaces/
RUN pip install --no-deps -e . && modloss --help >/dev/null

EXPOSE 5000 6379 8265
