"""Training side of aidx: datasets and converters, the synthetic phantom generator, and (with
``pip install aidx[train]``) the MONAI training loop, FROC evaluation and ONNX export.

Only modules that need torch import it; the phantom generator and dataset converters do not.
"""
