from sslkit.models.base import Encoder
from sslkit.models.registry import build_encoder, build_segmenter, encoder_names, register_encoder, register_segmenter

__all__ = ["Encoder", "build_encoder", "build_segmenter", "encoder_names", "register_encoder", "register_segmenter"]
