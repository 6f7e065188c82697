#!/bin/sh
# The image's install step (Dockerfile), also run by tests/deploy/test_recipe.py:
#   sh deploy/install.sh VENV cpu|cuda WHEEL_DIR
# torch first (the CPU build from PyTorch's index, or the CUDA build from PyPI, or from
# $TORCH_INDEX when set, with ninja for the kernels), then the kodkod wheel; every version from
# constraints.txt and deploy/torch.txt.
set -eu
venv=$1
flavour=$2
wheels=$3
here=$(cd "$(dirname "$0")" && pwd)
pip="$venv/bin/python -m pip --disable-pip-version-check"
case "$flavour" in
  cpu) $pip install --no-cache-dir -c "$here/torch.txt" torch \
         --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple ;;
  cuda) $pip install --no-cache-dir -c "$here/torch.txt" torch ninja \
         ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} ;;
  *) echo "install.sh: flavour must be cpu or cuda, not '$flavour'" >&2; exit 2 ;;
esac
$pip install --no-cache-dir -c "$here/../constraints.txt" "$wheels"/kodkod-*.whl
$pip check
