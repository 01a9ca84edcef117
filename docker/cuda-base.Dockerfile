# A CUDA base for docker/Dockerfile: NVIDIA's CUDA runtime with Ubuntu's Python 3.12.
#
#   docker build -f docker/cuda-base.Dockerfile -t llama-serve-cuda-base docker
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE=llama-serve-cuda-base \
#       -t llama-serve:cuda .
#   docker run --gpus all -p 127.0.0.1:8000:8000 llama-serve:cuda
#
# The torch that PyPI serves for Linux is the CUDA build (its CUDA libraries come as wheels),
# so build this without TORCH_INDEX_URL. The host needs the NVIDIA driver that build asks for
# (CUDA 13's, 580 or newer, for torch 2.11 and later from PyPI; an older driver takes a
# TORCH_INDEX_URL of an older CUDA, e.g. https://download.pytorch.org/whl/cu128) and the
# NVIDIA Container Toolkit for `--gpus`. The image serves on the GPU or not at all: a torch
# that finds no usable GPU stops the server at start-up instead of running it on the CPU.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
ENV LLAMA_SERVE_DEVICE=cuda
# Ubuntu's python3 of this release, whatever its patch version: no pin. Triton (the GPU path's
# kernels) builds its launcher with a C compiler and Python's headers on first use; without
# them the server falls back to PyTorch's ops, slower (README, Performance, GPU).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
        libc6-dev \
    && rm -rf /var/lib/apt/lists/*
