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
