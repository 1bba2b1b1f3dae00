"""Installs the repository's root folders as the ``internimage`` namespace, and builds the DCNv3
kernels and the region JPEG decoder.

``model/`` becomes ``internimage.model``, ``ops/`` becomes ``internimage.ops`` and so on, so the
repository keeps the flat layout people browse while imports stay namespaced.

Kernels (build with ``pip install --no-build-isolation``, so the installed torch is the one built
against): ``internimage.ops._cpu`` whenever a C++ compiler works, ``internimage.ops._cuda`` when
torch has CUDA and nvcc is found (``TORCH_CUDA_ARCH_LIST``; unset: the visible GPUs, else
sm_80 and sm_90, with PTX of the newest: ``ops/cuda_archs.py``). A failed or
impossible kernel build only warns: the package then runs the pure-PyTorch reference.
``internimage.data._jpeg`` (region-of-interest JPEG decoding) links the system libjpeg-turbo
(>= 2.1; Debian/Ubuntu ``libjpeg-dev``, RHEL ``libjpeg-turbo-devel``, conda ``libjpeg-turbo``);
without its headers the loader decodes whole images with simplejpeg instead.
"""
import os
import warnings

from setuptools import Extension, setup

SUBPACKAGES = ("model", "ops", "data", "pretrain")
CSRC = os.path.join("ops", "csrc")
JPEG_REGION_SOURCE = os.path.join("data", "csrc", "jpeg_region.cpp")


def _default_cuda_archs(torch) -> str:
    """ops/cuda_archs.py's choice for the GPUs visible here (loaded by path: not installed yet)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("cuda_archs", os.path.join("ops", "cuda_archs.py"))
    cuda_archs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_archs)
    visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return cuda_archs.default_arch_list(visible)


def _kernel_build():
    """(ext_modules, cmdclass) for the DCNv3 kernels and the region JPEG decoder; empty when torch
    cannot build them here."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        warnings.warn(f"internimage: torch not importable at build time ({error}); installing without "
                      f"compiled DCNv3 kernels. Install torch first and use --no-build-isolation.")
        return [], {}

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Builds each extension if it can; a failure warns instead of failing the install."""

        def build_extensions(self):
            self.failed = set()
            try:
                super().build_extensions()
            except Exception as error:  # no compiler at all fails before any extension starts
                warnings.warn(f"internimage: no extension built ({error}); the pure-Python paths "
                              f"run instead")
                self.failed = {ext.name for ext in self.extensions}
            # What failed is not an output: an editable install would otherwise try to copy it.
            self.extensions = [ext for ext in self.extensions if ext.name not in self.failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:
                self.failed.add(ext.name)
                warnings.warn(f"internimage: {ext.name} not built ({error}); its pure-Python "
                              f"fallback runs instead")

    # -fopenmp makes at::parallel_for (inline in ATen headers) actually fork; the GOMP symbols
    # resolve to the OpenMP runtime libtorch already loads, so no -lgomp (one runtime, one pool).
    cxx_flags = ["-O3", "-fopenmp"]
    extensions = [Extension("internimage.data._jpeg", [JPEG_REGION_SOURCE], libraries=["jpeg"],
                            extra_compile_args=["-O2"], language="c++"),
                  cpp_extension.CppExtension(
        "internimage.ops._cpu", [os.path.join(CSRC, "dcnv3_cpu.cpp")],
        extra_compile_args={"cxx": cxx_flags})]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_cuda_archs(torch))
        extensions.append(cpp_extension.CUDAExtension(
            "internimage.ops._cuda", [os.path.join(CSRC, "dcnv3_cuda.cu")],
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "-lineinfo"]}))
    return extensions, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _kernel_build()

setup(
    name="internimage",
    version="0.1.0",
    description="Pretraining InternImage (DCNv3) vision foundation models with DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    packages=[f"internimage.{name}" for name in SUBPACKAGES],
    package_dir={f"internimage.{name}": name for name in SUBPACKAGES},
    package_data={"internimage.data": ["class_lists/*.txt"]},  # zero-shot class names
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.18.0",  # universal resume at another world size fails before 0.18
        "webdataset>=0.2.86",
        "tensorboard>=2.14",
        "pyyaml>=6.0",
        "fvcore>=0.1.5.post20221221",
        "numpy>=1.24",
        "pillow>=10.0",
        "simplejpeg>=1.7",  # libjpeg-turbo decoding, ~20% faster than PIL's in the loader
        "safetensors>=0.4",  # .safetensors weight files
        "ftfy>=6.1",  # caption cleaning of the CLIP BPE tokenizer, as CLIP does it
    ],
    extras_require={
        "test": ["pytest>=7.4", "scikit-learn>=1.3", "tokenizers>=0.15", "ruff>=0.4",
                 "wandb>=0.17"],  # logging.wandb, tested offline
        "demo": ["scikit-learn>=1.3"],
    },
)
