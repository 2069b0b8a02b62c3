import json


def train_inputs(wildcards):
    return {"split": f"{R}/split/split.json", "h5": [h5(c) for c in SPLIT["train"] + SPLIT["val"]]}


def train_params_json(role):
    """Everything training reads from the config; a change to any of it (and only it) retrains."""
    return json.dumps({k: config[k] for k in ("window", "slices", "train")}, sort_keys=True)


def gpu_resources(role):
    use_gpu = config["train"]["device"] in ("auto", "cuda")
    return {"gpu": 1 if use_gpu else 0, "cpus_per_gpu": config["train"]["threads"] if use_gpu else 0}


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
        ckpt=f"{R}/checkpoints/classifier",
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
        **gpu_resources("classifier"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m liverseg train --role classifier --split {input.split:q} --h5-dir {R}/preprocess"
        " --config-json {params.cfg:q} --checkpoint-dir {params.ckpt:q} --threads {threads}"
        " {R}/train/classifier > {log:q} 2>&1"


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
        ckpt=lambda wc: f"{R}/checkpoints/model_{wc.specialist}",
    threads: config["train"]["threads"]
    resources:
        mem_mb=12000,
        runtime=720,
        **gpu_resources("specialist"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m liverseg train --role model_{wildcards.specialist} --split {input.split:q} --h5-dir {R}/preprocess"
        " --config-json {params.cfg:q} --checkpoint-dir {params.ckpt:q} --threads {threads}"
        " {R}/train/model_{wildcards.specialist} > {log:q} 2>&1"
