#!/usr/bin/env bash
# A user's own network, checkpoints and images, from nothing to a shipped model (run from this folder, with the
# project's virtualenv active: `source ../../.venv/bin/activate`).
set -euo pipefail
python make_images.py images
python train.py images
edgefuse export --model mynet:make_net checkpoints/* --data images --out-root build
ls build/cpu-ort build/cpu-ort/candidates
