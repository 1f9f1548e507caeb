"""The Triton Python-backend model (``model.py``) that rnnedge copies into a model repository.

It runs inside Triton's Python-backend stub, not in rnnedge's own processes; only its file
is read here (``rnnedge.triton.python_backend.model_py``).
"""
