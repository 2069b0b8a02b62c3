checkpoint split:
    input:
        cases=f"{R}/ingest/cases.tsv",
        checks=[check_file(c) for c in CASES],
    output:
        f"{R}/split/split.json",
    log:
        f"{R}/logs/split/split.log",
    params:
        seed=config["split"]["seed"],
        test=split_test_fraction(),
        val=config["split"]["val_fraction"],
        folds=config["split"]["folds"],
        fold=config["split"]["fold"],
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg split --cases {input.cases:q} --checks {input.checks:q} --seed {params.seed}"
        " --test-fraction {params.test} --val-fraction {params.val} --folds {params.folds} --fold {params.fold}"
        " {output:q} > {log:q} 2>&1"
