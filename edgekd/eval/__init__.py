"""Evaluation: insightface-style verification metrics (``metrics``), batched embeddings (``embed``), ROC plots."""
