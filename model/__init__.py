"""InternImage networks (seven variants, official weights, LR-decay ids, FLOP report) and the text tower."""
from .dcnv3 import DCNv3
from .factory import create_model, list_models
from .heads import new_classifier
from .internimage import VARIANTS, InternImage, InternImageArch
from .layer_decay import blocks_after, no_weight_decay, param_lr_scales
from .official_weights import extract_state_dict, load_pretrained
from .report import count_flops, model_report
from .text_tower import TextTransformer

__all__ = ["DCNv3", "VARIANTS", "InternImage", "InternImageArch", "blocks_after", "count_flops",
           "create_model", "extract_state_dict", "list_models", "load_pretrained", "model_report",
           "new_classifier",
           "no_weight_decay", "param_lr_scales", "TextTransformer"]
