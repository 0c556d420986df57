"""The serving layer: the kNN HTTP service (``serve``), offline evaluation (``eval``) and
pictures (``show``) over a trained encoder and its bank.

The kNN kernel itself (index, vote, evaluation) is :mod:`featurestore.knn`; this package
reaches the trainer only through :mod:`trainer.api`.
"""
