"""The steps put together: one run from settings to report (pipeline), the evaluation of a split, another dataset or
new images (evaluation), and ensembles of runs.

Imports every other room and `train.py`; only the programs at the top (driver.py, predict.py) import it.
"""
