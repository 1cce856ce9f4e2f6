#!/usr/bin/env bash
# Run here, before a device lease that trains the default model (gpu_check.sh's `train` stage):
# packs this machine's standard-library sources, the corpus the CPU default model was trained and
# evaluated on, into .gpu_data/stdlib.tar.gz (git-ignored; about 7 MB). Name `.gpu_data` in the
# device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
STDLIB=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
mkdir -p .gpu_data
(cd "$STDLIB" && find . -name '*.py' -not -path '*/site-packages/*' -not -path '*/__pycache__/*' -print0 \
  | tar --null -czf - -T -) > .gpu_data/stdlib.tar.gz
ls -la .gpu_data/stdlib.tar.gz
