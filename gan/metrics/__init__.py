"""Metrics of generated images: sample diversity (MS-SSIM, near duplicates) and mode coverage.

Import the modules themselves: `ms_ssim`, `diversity`, `mode_classifier`.
"""
