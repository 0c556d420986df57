"""The kNN kernel over a bank's rows: an exact or IVF index (FAISS or torch, CPU or GPU),
the weighted vote and the 200-NN evaluation.

Plain torch/numpy (FAISS when installed): used by the training loop's evaluation
(:mod:`trainer.evaluation`) and by the serving layer (:mod:`knn_service`).
"""

from featurestore.knn.evaluate import knn_evaluate, knn_predict
from featurestore.knn.index import KnnIndex
from featurestore.knn.vote import weighted_knn_vote

__all__ = ["KnnIndex", "knn_evaluate", "knn_predict", "weighted_knn_vote"]
