"""What a run writes for people: metrics.json and predictions.csv, the figures, the Grad-CAM gallery and similar
lesions, TensorBoard event files, and report.html with its template and style.

Imports `engine`, `isic`, `scoring`, `dataset.py` and `utils`.
"""
