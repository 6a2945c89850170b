"""The synthetic competition generator: a phantom lumbar spine in DICOM with a known answer.

Stands on :mod:`lsdc.contract` alone; nothing in the pipeline imports it back.
"""

from lsdc.synth.config import REALISM_RATES, SynthConfig
from lsdc.synth.generator import ANSWER_FILES, synthesize

__all__ = ["ANSWER_FILES", "REALISM_RATES", "SynthConfig", "synthesize"]
