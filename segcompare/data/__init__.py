"""Cityscapes data: labels, dataset, pipelines, input corruptions, the synthetic set."""
