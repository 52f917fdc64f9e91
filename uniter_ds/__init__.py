"""uniter-ds: UNITER image-text pretraining with DeepSpeed."""

__version__ = "0.1.0"
