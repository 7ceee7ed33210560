"""`iwarp eval`: the paper's protocol on the PyTorch network. `metrics` (PSNR, L1, SSIM,
perceptual distance, dlib landmarks and identity), `protocol` (reconstruction and
cross-identity driving), `report` (grids, plots, Markdown). Nothing is imported here: torch
and dlib load only when a module is used."""
