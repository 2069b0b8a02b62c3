"""liverseg: liver and liver-tumour segmentation in abdominal CT, stage by stage."""

__version__ = "0.1.0"
