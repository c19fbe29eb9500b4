"""Index and search: KMeans + KNN estimators and the `Searcher` that answers queries against a run."""
