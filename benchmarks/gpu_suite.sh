#!/usr/bin/env bash
# The GPU suite on a CUDA machine: every GPU-marked test, then the trainer tests, from this
# checkout. Wheels the machine lacks go in .whl/ (cp312 / py3, installed with --no-deps into
# /tmp/site): megatron-core 0.16.1, omegaconf 2.4.0, antlr4-python3-runtime 4.13.2,
# transformers 5.24.0, regex. Fetch them on a machine with a package index:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     megatron-core==0.16.1 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 \
#     transformers==5.24.0 regex
# Usage: bash benchmarks/gpu_suite.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/trainer "$@"  # every GPU-marked test lives there
python3 -m pytest -q -p no:cacheprovider tests/trainer -m "not gpu" "$@"
