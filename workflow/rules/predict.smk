rule predict:
    input:
        h5=lambda wc: h5(wc.case),
        models=models_for,
        specs=specs_for,
        threshold=threshold_input,
    output:
        seg=f"{R}/predict/{{experiment}}/{{case}}.nii.gz",
        scores=f"{R}/predict/{{experiment}}/{{case}}_slices.tsv",
        **PREDICT_OUTPUTS,
    log:
        f"{R}/logs/predict/{{experiment}}/{{case}}.log",
    benchmark:
        predict_benchmark("{experiment}", "{case}")
    params:
        mode=predict_mode,
        # Only what this experiment's mode reads: the gate is the cascade's, TTA the 2D models'.
        tta=lambda wc: str(config["predict"]["tta"]).lower() if predict_mode(wc) in ("cascade", "model_a") else "auto",
        gate=lambda wc: config["predict"]["gate"] if predict_mode(wc) == "cascade" else "auto",
        models=model_options,
        **PREDICT_PARAMS,
    threads: config["predict"]["threads"]
    resources:
        # How the job runs: not rerun triggers.
        predict_device=config["predict"]["device"],
        predict_batch=config["predict"]["batch_size"],
        **predict_sized(),
        **gpu_resources("predict"),
    conda:
        torch_env("predict")
    shell:
        "python -m liverseg.gpuslot --slots {resources.gpu_slots} --take {resources.gpu_take} --"
        " python -m liverseg predict-case --case {wildcards.case:q} --h5 {input.h5:q} {params.models}"
        " --mode {params.mode} --device {resources.predict_device} --tta {params.tta} --gate {params.gate}"
        " --batch {resources.predict_batch} --threads {threads}"
        # PREDICT_OPTIONS: "" unless the config asks for an ensemble or probability maps (common.smk)
        f" --scores {{output.scores:q}}{PREDICT_OPTIONS} {{output.seg:q}} > {{log:q}} 2>&1"
