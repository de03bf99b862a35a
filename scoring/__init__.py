"""The numbers of a scored set: a saved run's predictions, the training split's embeddings, kNN and retrieval in the
embedding space, visual agreement of neighbours, and the ISIC metrics.

Imports `engine`, `isic`, `dataset.py`, `modules.py` and `utils`; writes no file for people (that is `reporting`).
"""
