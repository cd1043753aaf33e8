"""Contrastive image-text retrieval and captioning toolkit.

Imports run one way: cli -> retrieval -> indexes. Inside retrieval, only pipelines/ touch indexes.
"""

__version__ = "0.1.0"
