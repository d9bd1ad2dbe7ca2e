"""Evaluation metrics of DOVE: PSNR, SSIM, image complexity, FID statistics and features, linear probing."""
