#!/usr/bin/env bash
# Fine-tunes of one pretrained network, from the user's checkpoint to a shipped model (run from this folder, with
# the project's virtualenv active: `source ../../.venv/bin/activate`). pretrain.py stands in for the checkpoint you
# already have; train.py is your fine-tuning script.
set -euo pipefail
python make_images.py
python pretrain.py
python train.py
edgefuse export --model mynet:make_net checkpoints/* --base pretrained.safetensors --data images --out-root build
ls build/cpu-ort build/cpu-ort/candidates
