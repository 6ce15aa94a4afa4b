"""segcompare: train, evaluate, run and compare HRNetV2 and SegFormer on Cityscapes."""

__version__ = "0.1.0"
