"""Models: building them from every source form (``sources``), meta-device skeletons of HF
directories, layer discovery and N:M eligibility (``layers``, ``inferred``), training and
calibration data specs, BatchNorm recalibration and evaluation. Imports formats/, nm/ and the base."""
