rule train:
    input:
        unpack(train_inputs),
    output:
        model=model_file("{role}"),
        spec=model_spec("{role}"),
        log_csv=f"{R}/train/{{role}}/log.csv",
        curves=report(f"{R}/train/{{role}}/curves.png", category="Training", caption="../report/curves.rst"),
    log:
        f"{R}/logs/train/{{role}}.log",
    benchmark:
        f"{R}/benchmarks/train/{{role}}.tsv"
    wildcard_constraints:
        role="|".join(ROLES),
    params:
        cfg=train_params_json,
        ckpt=lambda wc: f"{R}/checkpoints/{wc.role}",
        # A role without needs has no `needs` input at all (Snakemake drops empty named lists).
        needs=lambda wc, input: role_options("--needs", ROLES[wc.role]["needs"], getattr(input, "needs", [])),
    threads: config["train"]["threads"]
    resources:
        # How the job runs, not what it learns: resources are not rerun triggers (config.EXECUTION_ONLY).
        train_device=config["train"]["device"],
        # python -m liverseg, or torchrun with one process per GPU when train.gpus > 1 (liverseg.parallel)
        launch=launcher(config["train"]["gpus"]),
        loader_workers=config["train"]["workers"],
        **train_sized(),
        **gpu_resources("train"),
    conda:
        torch_env("train")
    shell:
        "python -m liverseg.gpuslot --slots {resources.gpu_slots} --take {resources.gpu_take} --"
        " {resources.launch} train --role {wildcards.role} --config-json {params.cfg:q}"
        " --train {input.train:q} --val {input.val:q} {params.needs} --checkpoint-dir {params.ckpt:q}"
        " --threads {threads} --device {resources.train_device} --workers {resources.loader_workers} --out-model {output.model:q} --out-spec {output.spec:q} --out-log {output.log_csv:q}"
        " --out-curves {output.curves:q} > {log:q} 2>&1"


# A fold ensemble (split.ensemble): the same job on fold {fold}'s cases, with the needed roles of that fold.
use rule train as train_fold with:
    input:
        unpack(train_fold_inputs),
    output:
        model=model_file("{role}", "{fold}"),
        spec=model_spec("{role}", "{fold}"),
        log_csv=f"{R}/train/{{role}}/fold_{{fold}}/log.csv",
        curves=report(f"{R}/train/{{role}}/fold_{{fold}}/curves.png", category="Training",
                      caption="../report/curves.rst"),
    log:
        f"{R}/logs/train/{{role}}/fold_{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/train/{{role}}/fold_{{fold}}.tsv"
    wildcard_constraints:
        role="|".join(ROLES),
        fold="[0-9]+",
    params:
        cfg=train_params_json,
        ckpt=lambda wc: f"{R}/checkpoints/{wc.role}/fold_{wc.fold}",
        needs=lambda wc, input: role_options("--needs", ROLES[wc.role]["needs"], getattr(input, "needs", [])),


# The fold ensemble's classifier threshold: every fold's classifier scores its own validation fold, and the
# threshold is chosen on the pooled scores (liverseg.ensemble), not averaged over the folds' own thresholds.
rule ensemble_threshold:
    input:
        models=[model_file("classifier", f) for f in FOLDS],
        specs=[model_spec("classifier", f) for f in FOLDS],
        val=ensemble_val_cases,
    output:
        ENSEMBLE_THRESHOLD,
    log:
        f"{R}/logs/train/classifier/ensemble_threshold.log",
    params:
        val=ensemble_val_options,
        models=lambda wc, input: " ".join(f"--model {shlex.quote(m)}" for m in input.models),
        min_sens=config["train"]["min_sensitivity"],
    threads: config["predict"]["threads"]
    resources:
        predict_device=config["predict"]["device"],
        # one validation case at a time through k classifiers: prediction's memory for the largest case; time for all
        **ensemble_threshold_sized(),
        **gpu_resources("predict"),
    conda:
        torch_env("predict")
    shell:
        "python -m liverseg.gpuslot --slots {resources.gpu_slots} --take {resources.gpu_take} --"
        " python -m liverseg ensemble-threshold {params.models} {params.val} --min-sensitivity {params.min_sens}"
        " --device {resources.predict_device} --threads {threads} {output:q} > {log:q} 2>&1"
