"""lora-course: the shared code of the course's notebooks."""
__version__ = "0.1.0"

from .report import record_metric

__all__ = ["__version__", "record_metric"]
