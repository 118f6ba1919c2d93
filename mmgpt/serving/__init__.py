"""Serving logic shared by the Triton model.py files; never imports triton_python_backend_utils."""
