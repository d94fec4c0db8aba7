"""Placeholder: filled by the QuEST kernels work (issue 4)."""
