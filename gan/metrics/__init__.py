"""Metrics of generated images: sample quality, sample diversity and mode coverage.

Import the modules themselves: `quality` (the Evaluator of `eval.metrics`) with `swd`, `fid`,
`precision_recall`, `inception` (the FID network; `pth` reads its weights) and `random_vgg` (an
embedding with no weights file); `ndb`, `ms_ssim`, `diversity` and `mode_classifier` for the
health signals.
"""
