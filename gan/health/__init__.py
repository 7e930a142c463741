"""Mode collapse, detected: diversity signals of the generator's samples and the verdict on them.

`signals.HealthProbe` measures, every `eval.every` steps, how diverse a fixed batch of samples is
against real images; `verdict.judge` turns the measures into healthy / suspect / collapsed /
unjudged. What to do about a collapse (`gan.rollback`) is the trainer's business, not theirs.
"""
