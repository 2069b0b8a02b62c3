rule postprocess:
    input:
        f"{R}/predict/{{experiment}}/{{case}}.nii.gz",
    output:
        f"{R}/postprocess/{{experiment}}/{{case}}.nii.gz",
    log:
        f"{R}/logs/postprocess/{{experiment}}/{{case}}.log",
    params:
        conn=config["postprocess"]["connectivity"],
        min_lesion=config["postprocess"]["min_lesion_mm3"],
        fill="--fill-holes" if config["postprocess"]["fill_holes"] else "",
    resources:
        **sized("postprocess"),
        **slurm_resources("cpu"),
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg postprocess --case {wildcards.case:q} --connectivity {params.conn}"
        " --min-lesion-mm3 {params.min_lesion} {params.fill} {input:q} {output:q} > {log:q} 2>&1"
