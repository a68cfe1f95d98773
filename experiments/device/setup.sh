# Sourced at the start of every device run: installs the carried wheels (.whl) and points
# FlashInfer's JIT cache at .fi (carried back and forth, see ../shared/device/README.md).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=$PWD:/tmp/site FLASHINFER_WORKSPACE_BASE=$PWD/.fi FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p .fi
nvidia-smi -L
python3 -c "import torch, flashinfer; print('torch', torch.__version__, 'flashinfer', flashinfer.__version__)"
# The device gets the tree without .git: the caller passes the commit (NANOSLG_COMMIT=$(git rev-parse HEAD)).
