"""Annotation formats, clip reading/writing, sampling and augmentation, the synthetic set."""
