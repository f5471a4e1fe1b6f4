"""Whole-model tools: conversion, population statistics, folding, freezing."""

from .convert import convert_model, fuse_bn_act
from .fold import ChannelAffine, fold_batchnorm
from .freeze import freeze_batchnorm, unfreeze_batchnorm
from .population import LayerPopulationReport, recompute_population_stats

__all__ = ["convert_model", "fuse_bn_act"]
__all__ += [
    "ChannelAffine",
    "LayerPopulationReport",
    "fold_batchnorm",
    "freeze_batchnorm",
    "recompute_population_stats",
    "unfreeze_batchnorm",
]
