"""Per-layer math, apart from any pipeline's lifecycle: calibration statistics, Wanda, SparseGPT
(masks and the OBS refit), the solver table, SR-STE, SAD results, and the fine-tuning losses."""
