"""kNN evaluation: weighted k-nearest-neighbour vote over a FAISS / torch index of the bank."""

from knn_service.evaluate import knn_evaluate, knn_predict
from knn_service.index import KnnIndex
from knn_service.vote import weighted_knn_vote

__all__ = ["KnnIndex", "knn_evaluate", "knn_predict", "weighted_knn_vote"]
