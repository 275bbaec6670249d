"""sslkit: self-supervised pretraining of 2D/3D Swin-family encoders on medical images."""

__version__ = "0.1.0"
