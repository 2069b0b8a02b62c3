rule statistics:
    input:
        pred=f"{R}/postprocess/{{experiment}}/{{case}}.nii.gz",
        image=case_image,
        models=models_for,
        specs=specs_for,
    output:
        f"{R}/statistics/{{experiment}}/{{case}}.json",
    log:
        f"{R}/logs/statistics/{{experiment}}/{{case}}.log",
    params:
        models=model_options,
    resources:
        **sized("statistics", "pred", "image"),
        **slurm_resources("cpu"),
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg statistics --case {wildcards.case:q} --experiment {wildcards.experiment}"
        " --image {input.image:q} --pred {input.pred:q} {params.models} {output:q} > {log:q} 2>&1"


rule collect_statistics:
    input:
        statistics_inputs,
    output:
        report(f"{R}/report/statistics.tsv", category="Summary", caption="../report/statistics.rst"),
    log:
        f"{R}/logs/report/statistics.log",
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg statistics-table --out {output:q} {input:q} > {log:q} 2>&1"


rule dicom_seg:
    input:
        pred=f"{R}/postprocess/{{experiment}}/{{case}}.nii.gz",
        series=case_image,
        models=models_for,
        specs=specs_for,
    output:
        f"{R}/dicom_seg/{{experiment}}/{{case}}.dcm",
    log:
        f"{R}/logs/dicom_seg/{{experiment}}/{{case}}.log",
    params:
        models=model_options,
    resources:
        **sized("dicom_seg", "pred", "series"),
        **slurm_resources("cpu"),
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg dicom-seg --case {wildcards.case:q} --series {input.series:q} --pred {input.pred:q}"
        " {params.models} {output:q} > {log:q} 2>&1"
