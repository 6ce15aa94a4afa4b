"""Cityscapes data: labels, dataset, pipelines, the synthetic set."""
