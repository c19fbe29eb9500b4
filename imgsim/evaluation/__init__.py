"""Evaluation: retrieval metrics on labelled data, label-free evaluation with edited copies, the edits, and plots."""
