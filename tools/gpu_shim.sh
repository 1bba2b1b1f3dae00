# Sourced by the GPU checks from the repository root. An installed internimage (pip install . on the
# node, the usual case) is used as it is: GPU_CHECK_BUILD=0. Without one (a lent machine with no
# package index), the checkout's folders are mapped to internimage.* by symlinks on PYTHONPATH and
# the kernels are built in place: GPU_CHECK_BUILD=1.
if (cd /tmp && python3 -c "import internimage.ops" > /dev/null 2>&1); then
  export GPU_CHECK_BUILD=0
else
  mkdir -p /tmp/shim/internimage
  for sub in model ops data pretrain; do ln -sfn "$PWD/$sub" "/tmp/shim/internimage/$sub"; done
  export PYTHONPATH=/tmp/shim${PYTHONPATH:+:$PYTHONPATH}
  export GPU_CHECK_BUILD=1
fi
