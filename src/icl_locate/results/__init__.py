"""Results: the study store, the analysis of stored curves, and reports."""
