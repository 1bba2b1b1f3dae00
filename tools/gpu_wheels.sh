#!/usr/bin/env bash
# Regenerates .whl/: the wheels the lent GPU machine lacks (it has no package index) for
# tools/gpu_check_training.sh, for CPython 3.12 manylinux x86_64. Versions are the dev venv's (tested).
# The machine already has torch, numpy, pyyaml, pillow, tqdm, packaging, psutil, py-cpuinfo, msgpack,
# ninja, einops, tabulate, portalocker, typing-extensions, nvidia-ml-py, tensorboard, scikit-learn
# (/work/.library/device/KINDS.md); the check at the end fails when a wheel needs anything else.
#   bash tools/gpu_wheels.sh        (from the repository root, with network to PyPI)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=.whl
# Only sdists on PyPI: built here into pure-Python wheels.
SDISTS=(deepspeed==0.19.8 fvcore==0.1.5.post20221221 iopath==0.1.10)
PACKAGES=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
          typing-inspection==0.4.5 webdataset==1.0.2 braceexpand==0.1.7
          yacs==0.1.8 termcolor==3.3.0
          simplejpeg==1.9.0
          # The machine has typing-extensions, of a version not known here; pydantic needs >= 4.16.
          typing-extensions==4.16.0)
# What the machine has, for the check (KINDS.md names; pip normalises - and _ alike).
DEVICE_HAS="torch numpy pyyaml pillow tqdm packaging psutil py-cpuinfo msgpack ninja einops tabulate
portalocker typing-extensions nvidia-ml-py tensorboard scikit-learn"

# pip's notes about this machine's local package folders are noise here.
pip_quiet() { python3 -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

rm -rf "$WHEELS" && mkdir -p "$WHEELS"
pip_quiet download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
# DS_BUILD_OPS=0: DeepSpeed's CUDA ops (FusedAdam) are built by JIT on the machine (ninja + nvcc
# are there), against its torch.
DS_BUILD_OPS=0 pip_quiet wheel -q --no-deps --no-build-isolation -w "$WHEELS" "${SDISTS[@]}"

python3 - "$WHEELS" "$DEVICE_HAS" <<'EOF'
"""Every Requires-Dist of every wheel (markers evaluated for CPython 3.12 on Linux, extras skipped)
is either another carried wheel or on the machine; one version of each."""
import collections, glob, re, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, device = sys.argv[1], {canonicalize_name(n) for n in sys.argv[2].split()}
environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython",
               "extra": ""}
wheels = {}
for path in sorted(glob.glob(f"{folder}/*.whl")):
    name = canonicalize_name(parse_wheel_filename(path.rsplit("/", 1)[1])[0])
    if name in wheels:
        sys.exit(f"two versions of {name}: {wheels[name]} and {path}")
    wheels[name] = path
missing = collections.defaultdict(list)
for name, path in wheels.items():
    with zipfile.ZipFile(path) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA")))
    for line in metadata.decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        needed = canonicalize_name(requirement.name)
        if needed not in wheels and needed not in device:
            missing[needed].append(name)
if missing:
    sys.exit(f"needed but neither carried nor on the machine: {dict(missing)}")
print(f"{len(wheels)} wheels, every requirement carried or on the machine")
EOF
du -ch "$WHEELS"/*.whl | tail -1
