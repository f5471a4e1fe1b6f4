"""Whole-model tools: conversion, population statistics, folding, freezing."""

from .convert import convert_model

__all__ = ["convert_model"]
