"""kdcache: offline LLaVA-KD distillation through a shared, verifiable cache of teacher targets."""

__version__ = "0.1.0"
