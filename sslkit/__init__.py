"""sslkit: self-supervised pretraining of 2D/3D Swin-family encoders on medical images."""

from sslkit.version import __version__  # noqa: F401


def from_pretrained(path):
    """The encoder a plan-carrying file or folder describes (an `sslkit export --format hf` folder, an encoder
    .safetensors, a checkpoint or run directory), weights loaded strictly, in eval mode; `encoder.plan` holds the
    plan. See sslkit.models.weights.from_pretrained."""
    from sslkit.models.weights import from_pretrained as load

    return load(path)
