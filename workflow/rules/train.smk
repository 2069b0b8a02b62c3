rule train_classifier:
    input:
        unpack(train_inputs),
    output:
        model=f"{R}/train/classifier/model.pt",
        spec=f"{R}/train/classifier/model.json",
        log_csv=f"{R}/train/classifier/log.csv",
        curves=report(f"{R}/train/classifier/curves.png", category="Training", caption="../report/curves.rst"),
    log:
        f"{R}/logs/train/classifier.log",
    benchmark:
        f"{R}/benchmarks/train/classifier.tsv"
    params:
        cfg=train_params_json("classifier"),
        split=train_split_json,
        ckpt=f"{R}/checkpoints/classifier",
        h5dir=f"{R}/preprocess",
        outdir=lambda wc, output: os.path.dirname(output.model),
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
        **gpu_resources("train"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m liverseg train --role classifier --split-json {params.split:q} --h5-dir {params.h5dir:q}"
        " --config-json {params.cfg:q} --checkpoint-dir {params.ckpt:q} --threads {threads}"
        " {params.outdir:q} > {log:q} 2>&1"


rule train_specialist:
    input:
        unpack(train_inputs),
    output:
        model=f"{R}/train/model_{{specialist}}/model.pt",
        spec=f"{R}/train/model_{{specialist}}/model.json",
        log_csv=f"{R}/train/model_{{specialist}}/log.csv",
        curves=report(f"{R}/train/model_{{specialist}}/curves.png", category="Training", caption="../report/curves.rst"),
    log:
        f"{R}/logs/train/model_{{specialist}}.log",
    benchmark:
        f"{R}/benchmarks/train/model_{{specialist}}.tsv"
    wildcard_constraints:
        specialist="a|b",
    params:
        cfg=train_params_json("specialist"),
        split=train_split_json,
        ckpt=lambda wc: f"{R}/checkpoints/model_{wc.specialist}",
        h5dir=f"{R}/preprocess",
        outdir=lambda wc, output: os.path.dirname(output.model),
    threads: config["train"]["threads"]
    resources:
        mem_mb=12000,
        runtime=720,
        **gpu_resources("train"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m liverseg train --role model_{wildcards.specialist} --split-json {params.split:q} --h5-dir {params.h5dir:q}"
        " --config-json {params.cfg:q} --checkpoint-dir {params.ckpt:q} --threads {threads}"
        " {params.outdir:q} > {log:q} 2>&1"


rule train_variant:
    input:
        unpack(train_inputs),
    output:
        model=f"{R}/train/{{variant}}/model.pt",
        spec=f"{R}/train/{{variant}}/model.json",
        log_csv=f"{R}/train/{{variant}}/log.csv",
        curves=report(f"{R}/train/{{variant}}/curves.png", category="Training", caption="../report/curves.rst"),
    log:
        f"{R}/logs/train/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/train/{{variant}}.tsv"
    wildcard_constraints:
        variant="v1_3dcnn|v3_convlstm",
    params:
        cfg=train_params_json("variant"),
        split=train_split_json,
        ckpt=lambda wc: f"{R}/checkpoints/{wc.variant}",
        h5dir=f"{R}/preprocess",
        outdir=lambda wc, output: os.path.dirname(output.model),
    threads: config["train"]["threads"]
    resources:
        mem_mb=16000,
        runtime=720,
        **gpu_resources("train"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m liverseg train --role {wildcards.variant} --split-json {params.split:q} --h5-dir {params.h5dir:q}"
        " --config-json {params.cfg:q} --checkpoint-dir {params.ckpt:q} --threads {threads}"
        " {params.outdir:q} > {log:q} 2>&1"
