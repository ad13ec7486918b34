"""Inference engine: series selection, DICOM to volume, preprocessing, ONNX Runtime, findings,
and the DICOM result writers (TID 1500 SR, SEG). Torch-free."""
