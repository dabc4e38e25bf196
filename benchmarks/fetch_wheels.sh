#!/usr/bin/env bash
# Download the wheels run_gpu.sh installs on a GPU machine that has torch but no network (Python 3.12,
# x86-64): core/ = transformers 5.24 and what it imports; extra/ = nnsight 0.8.1 and TransformerLens 4.3
# (benchmark-only comparisons, not product dependencies) and what they import. About 25 MB.
#
#   bash benchmarks/fetch_wheels.sh [.whl]      # then carry .whl to the machine, run benchmarks/run_gpu.sh
set -eu
DEST=${1:-.whl}
DL="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
mkdir -p "$DEST/core" "$DEST/extra"
$DL -d "$DEST/core" transformers==5.24.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
    tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.19 typing_extensions==4.16.0 filelock==4.3.1 fsspec==2026.9.0
$DL -d "$DEST/extra" nnsight==0.8.1 greenlet==3.5.6 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    jaxtyping==0.3.11 einops==0.8.2
ls "$DEST/core" "$DEST/extra"
