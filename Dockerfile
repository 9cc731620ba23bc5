# Cluster node image for lipnext_scale: Ray head and GPU worker nodes run the same image, so the
# Python, torch, DeepSpeed and Ray versions match on every node (Ray refuses mismatched versions).
#
#   docker build -t lipnext:latest .
#   docker build -t lipnext:cu128 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# The versions below are the ones the test suite runs against; change them together.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG DEEPSPEED_VERSION=0.19.8
ARG RAY_VERSION=2.60.0
ARG WEBDATASET_VERSION=1.0.2
# Extra fsspec backends for s3:// and gs:// storage and data URLs.
ARG EXTRA_PIP="s3fs gcsfs"
# H100 = 9.0; DeepSpeed compiles its CUDA ops for these architectures when they are first used.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev build-essential ninja-build git openssh-client rsync tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv ${VIRTUAL_ENV}

# torch first, from the CUDA index, so the package's `torch>=...` range is already satisfied below.
RUN pip install --upgrade pip \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && pip install "deepspeed==${DEEPSPEED_VERSION}" "ray[default,train]==${RAY_VERSION}" \
      "webdataset==${WEBDATASET_VERSION}" ${EXTRA_PIP}

# Non-root user: Ray workers, checkpoints and TensorBoard files are written as this user.
# (Ubuntu 24.04 images ship a user `ubuntu` with uid 1000; Ray's own images use `ray` with uid 1000.)
RUN (userdel --remove ubuntu 2>/dev/null || true) && useradd --create-home --uid 1000 --shell /bin/bash ray
WORKDIR /home/ray/lipnext_scale
COPY --chown=ray:ray pyproject.toml README.md* ./
COPY --chown=ray:ray lipnext_scale ./lipnext_scale
COPY --chown=ray:ray configs ./configs
COPY --chown=ray:ray launchers ./launchers
# Editable: the package finds configs/ next to its source (configs/deepspeed/*.json, configs/train/*.toml).
RUN pip install -e . && python -c "import lipnext_scale, deepspeed, ray, torch; print(torch.__version__, deepspeed.__version__, ray.__version__)"
USER ray

# Token auth is on for every Ray process in this image; supply the token at run time
# (RAY_AUTH_TOKEN_PATH to a mounted secret file, or RAY_AUTH_TOKEN), never bake it into the image.
ENV RAY_AUTH_MODE=token
# Ray's dashboard (8265) and GCS (6379) ports; bind the dashboard to 127.0.0.1 and tunnel to it (docs/multinode.md).
EXPOSE 6379 8265
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["bash"]
