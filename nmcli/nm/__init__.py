"""N:M math, the layer above the base: pattern parsing, masks and top-N selection, bit-level
compliance checks on packed masks, and the values+indices codec. Imports only the base modules;
torch is imported inside the functions that take tensors (``nm.masks``), never at import."""
