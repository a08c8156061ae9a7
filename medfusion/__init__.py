"""medfusion: multimodal medical-imaging diagnosis."""

__version__ = "0.1.0"
