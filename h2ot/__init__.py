"""h2ot: Hierarchical Hourglass Tokenizer (H2OT) for video pose transformers, in pure PyTorch.

This package never imports Ray or MLflow; `jobs/` and `pipelines/` build on it.
"""

__version__ = "0.1.0"
