"""Per-dataset K-means pseudo-labels: pure compute in kmeans.py, Ray actors in pool.py."""
