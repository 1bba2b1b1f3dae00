# Sourced by the GPU checks (ops/ and pretrain/device_check.sh), from the repository root: the
# installed package maps repository folders to internimage.*; an in-place build mirrors that
# mapping with symlinks on PYTHONPATH instead of installing (the device has no package index).
mkdir -p /tmp/shim/internimage
for sub in model ops data pretrain; do ln -sfn "$PWD/$sub" "/tmp/shim/internimage/$sub"; done
export PYTHONPATH=/tmp/shim${PYTHONPATH:+:$PYTHONPATH}
