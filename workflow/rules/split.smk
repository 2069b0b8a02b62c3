rule split:
    input:
        f"{R}/ingest/cases.tsv",
    output:
        f"{R}/split/split.json",
    log:
        f"{R}/logs/split/split.log",
    params:
        seed=config["split"]["seed"],
        test=config["split"]["test_fraction"],
        val=config["split"]["val_fraction"],
        folds=config["split"]["folds"],
        fold=config["split"]["fold"],
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg split --cases {input:q} --seed {params.seed} --test-fraction {params.test}"
        " --val-fraction {params.val} --folds {params.folds} --fold {params.fold} {output:q} > {log:q} 2>&1"
