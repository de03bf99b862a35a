"""Reading an ISIC dataset: its metadata CSV and image folder, the leakage-free split, decoded images and their cache,
patient metadata as model input, and the synthetic demo set in the same layout.

Imports `engine` and `utils`; `dataset.py` turns what lives here into datasets and loaders.
"""
