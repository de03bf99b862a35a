"""The machinery of a run: its settings, device and precision, torchrun, checkpoints, the weight average, the loss,
the augmentation and the phase timings.

Imports only `utils` and libraries: every other room builds on this one.
"""
