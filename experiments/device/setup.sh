# Sourced at the start of every device run: installs the carried wheels (.whl), unpacks FlashInfer's
# JIT cache (.fi/cache.tgz, carried back and forth, see ../shared/device/README.md) and offers its
# compiled modules to FlashInfer as ahead-of-time builds.
[ -d /tmp/site/flashinfer ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=$PWD:/tmp/site FLASHINFER_WORKSPACE_BASE=$PWD/.fi FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p .fi
[ -f .fi/cache.tgz ] && tar xzmf .fi/cache.tgz -C .fi
# save_fi: the compiled modules (only the .so files, the rest is rebuilt or not needed) come back as
# $OUT/fi-so.tgz.* pieces under the 16 MiB file limit; here, `cat fi-so.tgz.* > .fi/cache.tgz`.
save_fi() { (cd .fi && find .cache -name "*.so" -path "*cached_ops*" -print0 | tar czf - --null -T -) | split -b 15m - "$OUT/fi-so.tgz."; }
# At most 8 files come back from $OUT: scripts write their logs under $OUT/logs/, and save_out packs
# them into $OUT/logs.tgz and this run's new records into $OUT/records.tgz (here: tar xzf each).
touch /tmp/nanoslg-run-start
mkdir -p "$OUT/logs"
save_records() {
  find experiments -path "*/records/*.json" -newer /tmp/nanoslg-run-start -print0 | tar czf "$OUT/records.tgz" --null -T -
}
save_out() {
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
  save_records
}
# FlashInfer runs ninja before loading a JIT module, and ninja rebuilds whatever is older than the
# freshly installed headers: about 4 minutes on every fresh machine. A module found under the
# package's data/aot folder is loaded without ninja, so the cached builds go there.
FI_VER=$(python3 -c "import flashinfer; print(flashinfer.__version__)")
for so in .fi/.cache/flashinfer/"$FI_VER"/*/cached_ops/*/*.so; do
  [ -f "$so" ] || continue
  name=$(basename "$(dirname "$so")")
  mkdir -p "/tmp/site/flashinfer/data/aot/$name" && cp "$so" "/tmp/site/flashinfer/data/aot/$name/"
done
nvidia-smi -L
python3 -c "import torch, flashinfer, llguidance; print('torch', torch.__version__, 'flashinfer', flashinfer.__version__, 'llguidance', llguidance.__version__)" \
  || echo "WARNING: torch, flashinfer or llguidance does not import: run experiments/device/fetch-extra-wheels.sh" >&2
echo "FlashInfer modules offered as AOT: $(ls /tmp/site/flashinfer/data/aot 2>/dev/null | wc -l)"
# The device gets a tree whose .git may be stale: the caller passes the commit, typed out
# (NANOSLG_COMMIT=abc1234; a $(git rev-parse HEAD) in the command runs there and reads the stale one).
[ -n "${NANOSLG_COMMIT:-}" ] || echo "WARNING: NANOSLG_COMMIT is unset: records will name the device copy's stale commit" >&2
