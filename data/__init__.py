"""Samples in, batches out: WebDataset shards -> resumable weighted stream -> uint8 batches.

Public API (what the pretraining engine uses): ``SourceConfig``, ``DataConfig``,
``build_train_loader``, ``build_eval_loader``, ``DeviceTransform``, ``Tokenizer``,
``write_demo_data``, ``load_class_names``; tools: ``python -m internimage.data.write_shards``, ``.demo``, ``.bench``.
"""
from .class_names import SHIPPED_CLASS_LISTS, load_class_names
from .config import DataConfig, SourceConfig
from .device import IMAGENET_MEAN, IMAGENET_STD, DeviceTransform
from .faults import REASONS as SKIP_REASONS
from .loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from .tokenizer import Tokenizer
from .writer import Sample, ShardWriter


def write_demo_data(out_dir: str) -> dict:
    """See ``internimage.data.demo.write_demo_data`` (imports scikit-learn only when called)."""
    from .demo import write_demo_data as write

    return write(out_dir)


__all__ = ["DataConfig", "SourceConfig", "DeviceTransform", "IMAGENET_MEAN", "IMAGENET_STD",
           "SKIP_REASONS", "EvalLoader", "TrainLoader", "build_eval_loader", "build_train_loader",
           "Tokenizer", "Sample", "ShardWriter", "write_demo_data", "SHIPPED_CLASS_LISTS", "load_class_names"]
