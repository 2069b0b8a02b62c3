rule predict:
    input:
        h5=lambda wc: h5(wc.case),
        models=models_for,
    output:
        seg=f"{R}/predict/{{experiment}}/{{case}}.nii.gz",
        scores=f"{R}/predict/{{experiment}}/{{case}}_slices.tsv",
    log:
        f"{R}/logs/predict/{{experiment}}/{{case}}.log",
    benchmark:
        predict_benchmark("{experiment}", "{case}")
    params:
        mode=predict_mode,
        device=config["predict"]["device"],
        tta=str(config["predict"]["tta"]).lower(),
        gate=config["predict"]["gate"],
        batch=config["predict"]["batch_size"],
        models=lambda wc, input: role_options("--model", MODES[predict_mode(wc)], input.models),
    threads: config["predict"]["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
        **gpu_resources("predict"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m liverseg predict-case --case {wildcards.case:q} --h5 {input.h5:q} {params.models}"
        " --mode {params.mode} --device {params.device} --tta {params.tta} --gate {params.gate} --batch {params.batch}"
        " --threads {threads}"
        " --scores {output.scores:q} {output.seg:q} > {log:q} 2>&1"
