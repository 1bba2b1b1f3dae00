"""Installs the repository's root folders as the ``internimage`` namespace.

``model/`` becomes ``internimage.model``, ``ops/`` becomes ``internimage.ops`` and so on, so the
repository keeps the flat layout people browse while imports stay namespaced.
"""
from setuptools import setup

SUBPACKAGES = ("model", "ops", "data", "pretrain")

setup(
    name="internimage",
    version="0.1.0",
    description="Pretraining InternImage (DCNv3) vision foundation models with DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    packages=[f"internimage.{name}" for name in SUBPACKAGES],
    package_dir={f"internimage.{name}": name for name in SUBPACKAGES},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "webdataset>=0.2.86",
        "tensorboard>=2.14",
        "pyyaml>=6.0",
        "fvcore>=0.1.5.post20221221",
        "numpy>=1.24",
        "pillow>=10.0",
    ],
    extras_require={
        "test": ["pytest>=7.4", "scikit-learn>=1.3"],
        "demo": ["scikit-learn>=1.3"],
    },
)
