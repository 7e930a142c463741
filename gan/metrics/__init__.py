"""Metrics of generated images: sample quality, sample diversity and mode coverage.

Import the modules themselves: `quality` (the Evaluator of `eval.metrics`) with `swd`, `fid`,
`precision_recall` and `inception` (the FID network; `pth` reads its weights); `ms_ssim`,
`diversity` and `mode_classifier` for the health signals.
"""
