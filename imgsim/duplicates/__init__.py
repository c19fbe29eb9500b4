"""Duplicates: exact and near-duplicate groups, geometric and dense verification of pairs, and their reports."""
