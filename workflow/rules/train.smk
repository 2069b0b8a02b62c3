rule train:
    input:
        unpack(train_inputs),
    output:
        model=f"{R}/train/{{role}}/model.pt",
        spec=f"{R}/train/{{role}}/model.json",
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
        split=train_split_json,
        ckpt=lambda wc: f"{R}/checkpoints/{wc.role}",
        h5dir=f"{R}/preprocess",
        needs=lambda wc, input: " ".join(f"--needs {shlex.quote(f'{r}={p}')}" for r, p in zip(ROLES[wc.role]["needs"], getattr(input, "needs", []))),
        outdir=lambda wc, output: os.path.dirname(output.model),
    threads: config["train"]["threads"]
    resources:
        mem_mb=lambda wc: ROLES[wc.role]["mem_mb"],
        runtime=lambda wc: ROLES[wc.role]["runtime"],
        **gpu_resources("train"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m liverseg train --role {wildcards.role} --split-json {params.split:q} --h5-dir {params.h5dir:q}"
        " --config-json {params.cfg:q} --checkpoint-dir {params.ckpt:q} --threads {threads}"
        " {params.needs} {params.outdir:q} > {log:q} 2>&1"
