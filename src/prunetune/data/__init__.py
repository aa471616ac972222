"""Text sources, tokenisation and calibration sampling."""

from .sources import TextSource, load_text, token_stream
from .calibration import sample_calibration

__all__ = ["TextSource", "load_text", "token_stream", "sample_calibration"]
