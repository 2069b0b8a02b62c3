# liverseg: liver and liver-tumour segmentation in abdominal CT.
# Table of contents: validation and case discovery, then one rules file per stage, then the targets.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"


# With --software-deployment-method apptainer every job runs in this image (container/liverseg.def); none by default.
container: config["software"]["container"] or None


include: "workflow/rules/ingest.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/postprocess.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/statistics.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/kaggle.smk"


rule all:
    default_target: True
    input:
        all_targets,


# `snakemake data`: only the data stages (phantom, checks, split, HDF5 of every usable case).
rule data:
    input:
        data_targets,
