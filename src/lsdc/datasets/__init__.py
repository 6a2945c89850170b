"""Tensors from the cache: whole-study volumes, level crops, and their dictionary transforms."""

from lsdc.datasets.crops import CropSpec, extract_crop, locate_in_stacks
from lsdc.datasets.levels import StackStore, TwoStageDataset
from lsdc.datasets.transforms import RandFlipLeftRightd, flip_left_right, training_transforms
from lsdc.datasets.whole_study import StudyVolumeStore, WholeStudyDataset

__all__ = [
    "CropSpec",
    "RandFlipLeftRightd",
    "StackStore",
    "StudyVolumeStore",
    "TwoStageDataset",
    "WholeStudyDataset",
    "extract_crop",
    "flip_left_right",
    "locate_in_stacks",
    "training_transforms",
]
