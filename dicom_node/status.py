"""DIMSE status codes the node returns (PS3.7 Annex C and the C-STORE statuses of PS3.4 B.2.3)."""

SUCCESS = 0x0000
# Refused: the calling AE may not use this service ("Not Authorized", PS3.7 Annex C).
REFUSED_NOT_AUTHORIZED = 0x0124
# Refused: out of resources (disk floor reached, or the file could not be written).
OUT_OF_RESOURCES = 0xA700
# Error: the data set does not match the SOP class (or the UIDs in the request).
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# Failure: the SOP Instance UID is in use by another study, series or patient (PS3.7 C.4).
DUPLICATE_SOP_INSTANCE = 0x0111
# Error: cannot understand (malformed, undecodable or missing required UIDs).
CANNOT_UNDERSTAND = 0xC000
# Processing failure: an unexpected error in the node; logged with its traceback.
PROCESSING_FAILURE = 0x0110
