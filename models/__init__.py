"""Model registry (versioned ONNX artifacts with model cards) and the shipped default model.

The registry is torch-free and used by the serving path; network definitions for training live
in modules named ``networks*`` and are imported only by ``training``.
"""
