"""Alert detection benchmark: real trainings built from maintained external code (lightly's SSL
losses and heads; the plasticity and Q-Score scenarios), ground truth from the trainings
themselves (linear probe, k-NN, task accuracy), and repwatch's alert rules replayed on what the
monitor published. ``python -m benchmarks.detection --help``; results in docs/detection.md.
"""
