"""The node's DICOMweb service (PS3.18): STOW-RS in, QIDO-RS and WADO-RS out, over what the
node stores and aidx's own results."""
