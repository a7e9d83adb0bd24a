"""nirdml: Non-isotropy Regularization for proxy-based Deep Metric Learning."""

__version__ = "0.1.0"
